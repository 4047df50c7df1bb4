// The production Shopify theme's calls to its background-removal host, rebuilt request by request.
//
// Theme: GitHub perkins228/perkie-gemini (assets/, snippets/). Each function below builds the
// request the way the cited theme code builds it (same FormData fields, names, order and value
// types, same query string, same fetch options) and reads the answer the way that code reads it.
// Only the request and the reading are rebuilt: progress timers, storage, analytics and the
// theme's UI are left out. The host is the page's `?api=` (the theme hard-codes its Cloud Run URL).
"use strict";

(function () {
  const API = new URLSearchParams(location.search).get("api");

  function readAsDataURL(blob) {
    return new Promise((resolve) => {
      const reader = new FileReader();
      reader.onloadend = () => resolve(reader.result);
      reader.readAsDataURL(blob);
    });
  }

  // assets/pet-processor.js `resizeImageForUpload(file, maxDimension = 1600)` (lines 2297-2345):
  // photos larger than 1600 px on a side are drawn on a canvas and re-encoded as a JPEG File
  // (quality 0.90) with the original name; smaller ones are sent as they are.
  function petProcessorResize(file, maxDimension) {
    return new Promise((resolve) => {
      const img = new Image();
      img.onload = () => {
        if (img.width <= maxDimension && img.height <= maxDimension) {
          resolve(file);
          return;
        }
        let newWidth, newHeight;
        if (img.width > img.height) {
          newWidth = maxDimension;
          newHeight = Math.round(img.height * (maxDimension / img.width));
        } else {
          newHeight = maxDimension;
          newWidth = Math.round(img.width * (maxDimension / img.height));
        }
        const canvas = document.createElement("canvas");
        canvas.width = newWidth;
        canvas.height = newHeight;
        const ctx = canvas.getContext("2d");
        ctx.imageSmoothingEnabled = true;
        ctx.imageSmoothingQuality = "high";
        ctx.drawImage(img, 0, 0, newWidth, newHeight);
        canvas.toBlob(
          (blob) => resolve(new File([blob], file.name, { type: "image/jpeg" })),
          "image/jpeg",
          0.9,
        );
      };
      const reader = new FileReader();
      reader.onload = (e) => {
        img.src = e.target.result;
      };
      reader.readAsDataURL(file);
    });
  }

  // assets/pet-processor.js `callAPI(file)` (lines 1858-1962, 2051): resize, then
  //   formData.append('file', resizedFile); formData.append('effects', 'enhancedblackwhite,color');
  //   fetch(`${apiUrl}/api/v2/process-with-effects?return_all_effects=true&effects=enhancedblackwhite,color`,
  //         {method: 'POST', body: formData})
  // `!response.ok` throws `API error: <status>`; the answer's `data.effects` values become data
  // URLs ("data:image/png;base64," prepended unless already a data URL) shown as <img src>, and
  // `data.processed_image || effectsData.color || effectsData.enhancedblackwhite` goes to the
  // artistic-styles API as a data URL.
  async function petProcessorCallAPI(file) {
    const resizedFile = await petProcessorResize(file, 1600);
    const formData = new FormData();
    formData.append("file", resizedFile);
    formData.append("effects", "enhancedblackwhite,color");
    const response = await fetch(
      `${API}/api/v2/process-with-effects?return_all_effects=true&effects=enhancedblackwhite,color`,
      { method: "POST", body: formData },
    );
    if (!response.ok) {
      throw new Error(`API error: ${response.status}`);
    }
    const data = await response.json();
    const effectsData = data.effects || {};
    const dataUrls = {};
    for (const [effectName, base64Data] of Object.entries(effectsData)) {
      dataUrls[effectName] = base64Data.startsWith("data:image/") ? base64Data : `data:image/png;base64,${base64Data}`;
    }
    const processedImage = data.processed_image || effectsData.color || effectsData.enhancedblackwhite;
    const geminiInput = processedImage.startsWith("data:") ? processedImage : `data:image/png;base64,${processedImage}`;
    return { sent: { name: resizedFile.name, type: resizedFile.type, size: resizedFile.size }, dataUrls, geminiInput };
  }

  // assets/pet-processor.js `resegmentGeminiEffect(imageUrl)` (lines 2373-2420): the generated
  // image is fetched, then
  //   formData.append('file', blob, 'gemini-effect.png');
  //   fetch(`${apiUrl}/remove-background?format=webp`, {method: 'POST', body: formData})
  // and the binary answer is read with FileReader.readAsDataURL into `{dataUrl, success}`.
  async function petProcessorResegment(imageUrl) {
    try {
      const response = await fetch(imageUrl);
      if (!response.ok) {
        throw new Error(`Failed to fetch Gemini image: ${response.status}`);
      }
      const blob = await response.blob();
      const formData = new FormData();
      formData.append("file", blob, "gemini-effect.png");
      const birefnetResponse = await fetch(`${API}/remove-background?format=webp`, {
        method: "POST",
        body: formData,
      });
      if (!birefnetResponse.ok) {
        throw new Error(`BiRefNet re-segmentation failed: ${birefnetResponse.status}`);
      }
      const imageBlob = await birefnetResponse.blob();
      const dataUrl = await readAsDataURL(imageBlob);
      return { dataUrl, success: true };
    } catch (error) {
      return { dataUrl: null, success: false, error: String(error) };
    }
  }

  // assets/inline-preview-mvp.js `removeBackground(file)` (lines 911-948), given the picked file
  // (`correctImageOrientation` returns it unchanged when EXIF says orientation 1, lines 607-625):
  //   formData.append('file', file);
  //   fetch(`${API_URL}?return_all_effects=true&effects=enhancedblackwhite,color`, {method: 'POST', body: formData})
  // `!response.ok` reads the text and throws; `!result.success || !result.effects` throws; each
  // value becomes a data URL as in pet-processor.js.
  async function inlinePreviewRemoveBackground(file) {
    const API_URL = `${API}/api/v2/process-with-effects`;
    const formData = new FormData();
    formData.append("file", file);
    const response = await fetch(`${API_URL}?return_all_effects=true&effects=enhancedblackwhite,color`, {
      method: "POST",
      body: formData,
    });
    if (!response.ok) {
      const errorText = await response.text();
      console.error("API Error:", errorText);
      throw new Error(`Background removal failed: ${response.status}`);
    }
    const result = await response.json();
    if (!result.success || !result.effects) {
      throw new Error("No processed effects returned");
    }
    const effects = {};
    for (const [effectName, base64Data] of Object.entries(result.effects)) {
      effects[effectName] = base64Data.startsWith("data:image/") ? base64Data : `data:image/png;base64,${base64Data}`;
    }
    return effects;
  }

  // assets/api-client.js `APIClient` (lines 18-279): `request()` / `executeWithRetry()` send
  //   fetch(url, {...options, signal, mode: 'cors', headers: {'Accept': 'application/json', ...options.headers}})
  // with up to 2 attempts (1 s apart) and a per-request timeout; a JSON answer with `effects` has
  // each value stripped of any `data:image/...;base64,` prefix, turned into a Blob through
  // fetch(`data:image/png;base64,...`) and an object URL; `color` (else the first) is returned.
  class APIClient {
    constructor(useBirefnet) {
      this.useBirefnet = useBirefnet;
      this.baseUrl = API;
      this.maxRetries = 2;
      this.timeout = 30000;
      this.effectUrls = {};
    }

    // lines 29-49: `effects` and `session_id` go in the form, only return_all_effects in the query.
    async removeBackground(file) {
      const formData = new FormData();
      formData.append("file", file);
      const effects = this.useBirefnet ? "color,enhancedblackwhite" : "color,enhancedblackwhite,optimized_popart,dithering";
      formData.append("effects", effects);
      formData.append("session_id", "perkie_" + Date.now());
      return this.request("/api/v2/process-with-effects?return_all_effects=true", {
        method: "POST",
        body: formData,
        timeout: this.useBirefnet ? 30000 : 45000,
      });
    }

    // lines 259-279: the body is the object `{}` (fetch sends its string form) with a JSON content type.
    async warmup() {
      try {
        const response = await this.request("/warmup", {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: {},
          timeout: 90000,
        });
        if (response && response.model_ready) {
          return true;
        }
        return false;
      } catch (e) {
        return false;
      }
    }

    async request(endpoint, options = {}) {
      return this.executeWithRetry(`${this.baseUrl}${endpoint}`, options);
    }

    async executeWithRetry(url, options, attempt = 1) {
      try {
        const controller = new AbortController();
        const timeoutId = setTimeout(() => controller.abort(), options.timeout || this.timeout);
        const response = await fetch(url, {
          ...options,
          signal: controller.signal,
          mode: "cors",
          headers: { Accept: "application/json", ...options.headers },
        });
        clearTimeout(timeoutId);
        if (!response.ok) {
          throw new Error(`API error: ${response.status}`);
        }
        const contentType = response.headers.get("content-type");
        if (contentType?.includes("application/json")) {
          const data = await response.json();
          if (data.effects) {
            for (const [effectName, base64Data] of Object.entries(data.effects)) {
              const blob = await this.base64ToBlob(base64Data, "image/png");
              this.effectUrls[effectName] = URL.createObjectURL(blob);
            }
            return this.effectUrls.color || Object.values(this.effectUrls)[0];
          }
          return data;
        } else if (contentType?.includes("image")) {
          return URL.createObjectURL(await response.blob());
        }
        return URL.createObjectURL(await response.blob());
      } catch (error) {
        if (attempt < this.maxRetries) {
          await new Promise((resolve) => setTimeout(resolve, Math.min(1000 * Math.pow(2, attempt - 1), 5000)));
          return this.executeWithRetry(url, options, attempt + 1);
        }
        throw error;
      }
    }

    async base64ToBlob(base64Data, mimeType) {
      const base64String = base64Data.replace(/^data:image\/[a-z]+;base64,/, "");
      const response = await fetch(`data:${mimeType};base64,${base64String}`);
      return await response.blob();
    }
  }

  // assets/pet-processor.js `uploadToGCS(dataUrl, sessionKey, imageType, effect)` (lines 3710-3760):
  //   formData.append('file', blob, `${sessionKey}_${imageType}_${effect}_${Date.now()}.png`);
  //   'session_id', 'image_type' ('original' | `processed_${effect}`), 'tier' ('temporary'),
  //   'pet_name' when the pet has one, 'effect_applied' unless the effect is 'none';
  //   fetch(`${host}/store-image`, {method: 'POST', body: formData}); reads `result.success && result.url`.
  // `uploadOriginalToGCS(file, sessionKey)` (lines 3784-3806) reads the file as a data URL and calls it
  // with ('original', 'source').
  async function petProcessorUploadToGCS(dataUrl, sessionKey, imageType, effect = "none", petName = null) {
    const response = await fetch(dataUrl);
    const blob = await response.blob();
    const formData = new FormData();
    const filename = `${sessionKey}_${imageType}_${effect}_${Date.now()}.png`;
    formData.append("file", blob, filename);
    formData.append("session_id", sessionKey);
    formData.append("image_type", imageType === "original" ? "original" : `processed_${effect}`);
    formData.append("tier", "temporary");
    if (petName) {
      formData.append("pet_name", petName);
    }
    if (effect && effect !== "none") {
      formData.append("effect_applied", effect);
    }
    const uploadResponse = await fetch(`${API}/store-image`, { method: "POST", body: formData });
    if (!uploadResponse.ok) {
      return { url: null, status: uploadResponse.status, text: await uploadResponse.text() };
    }
    const result = await uploadResponse.json();
    return { url: result.success && result.url ? result.url : null };
  }

  async function petProcessorUploadOriginal(file, sessionKey) {
    const dataUrl = await readAsDataURL(file);
    return petProcessorUploadToGCS(dataUrl, sessionKey, "original", "source");
  }

  // assets/inline-preview-mvp.js `uploadEffectToGCS` (lines 1533-1562) makes
  // new File([blob], `${sessionKey}_${effectName}.png`, {type: 'image/png'}) from the data URL and,
  // without the direct-upload handler, calls `uploadViaInSPyReNet` (lines 1571-1597):
  //   'file' (file, file.name), 'session_id', 'image_type' (`processed_${effectName}`), 'tier' ('temporary');
  // `uploadOriginalToGCS(file, sessionKey)` (lines 1605-1644) sends the same fields with 'original'.
  // Both read `result.success` / `result.url`.
  async function inlinePreviewUploadEffect(dataUrl, sessionKey, effectName) {
    const response = await fetch(dataUrl);
    const blob = await response.blob();
    const file = new File([blob], `${sessionKey}_${effectName}.png`, { type: "image/png" });
    const formData = new FormData();
    formData.append("file", file, file.name);
    formData.append("session_id", sessionKey);
    formData.append("image_type", `processed_${effectName}`);
    formData.append("tier", "temporary");
    const uploadResponse = await fetch(`${API}/store-image`, { method: "POST", body: formData });
    if (!uploadResponse.ok) {
      throw new Error(`HTTP ${uploadResponse.status}`);
    }
    const result = await uploadResponse.json();
    return { url: result.success ? result.url : null };
  }

  async function inlinePreviewUploadOriginal(file, sessionKey) {
    const formData = new FormData();
    formData.append("file", file, file.name);
    formData.append("session_id", sessionKey);
    formData.append("image_type", "original");
    formData.append("tier", "temporary");
    const uploadResponse = await fetch(`${API}/store-image`, { method: "POST", body: formData });
    if (!uploadResponse.ok) {
      throw new Error(`HTTP ${uploadResponse.status}`);
    }
    const result = await uploadResponse.json();
    return { url: result.success && result.url ? result.url : null };
  }

  // snippets/ks-product-pet-selector-stitch.liquid `uploadToServer(file, petIndex, retryCount)`
  // (lines 2397-2450), its fallback after the direct upload to another host fails:
  //   'file' (file, file.name), 'image_type' ('original'), 'tier' ('temporary'), 'session_id';
  //   fetch(`${host}/store-image`, {method: 'POST', body: formData, signal: AbortSignal.timeout(30000)})
  // up to 3 attempts (0 s, 1 s, 3 s apart); reads `result.success && result.url`.
  async function stitchUploadToServer(file, sessionId, retryCount = 0) {
    const maxRetries = 3;
    const retryDelays = [0, 1000, 3000];
    try {
      const formData = new FormData();
      formData.append("file", file, file.name);
      formData.append("image_type", "original");
      formData.append("tier", "temporary");
      formData.append("session_id", sessionId);
      const response = await fetch(`${API}/store-image`, {
        method: "POST",
        body: formData,
        signal: AbortSignal.timeout(30000),
      });
      if (!response.ok) {
        throw new Error(`Upload failed: ${response.status}`);
      }
      const result = await response.json();
      if (result.success && result.url) {
        return { success: true, url: result.url };
      }
      throw new Error("No URL in response");
    } catch (error) {
      if (retryCount < maxRetries - 1) {
        await new Promise((resolve) => setTimeout(resolve, retryDelays[retryCount + 1]));
        return stitchUploadToServer(file, sessionId, retryCount + 1);
      }
      return { success: false, url: null, error: String(error) };
    }
  }

  // How the theme shows a result: as an <img src>. Resolves with what the browser decoded.
  function show(src) {
    return new Promise((resolve) => {
      const img = document.createElement("img");
      img.onload = () => resolve({ loaded: true, width: img.naturalWidth, height: img.naturalHeight });
      img.onerror = () => resolve({ loaded: false, width: 0, height: 0 });
      document.getElementById("results").appendChild(img);
      img.src = src;
    });
  }

  // Whether a decoded image has transparent pixels (the background was removed).
  async function transparency(src) {
    const img = new Image();
    img.src = src;
    await img.decode();
    const canvas = document.createElement("canvas");
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0);
    const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    let transparent = 0;
    for (let i = 3; i < pixels.length; i += 4) if (pixels[i] < 255) transparent += 1;
    return transparent / (pixels.length / 4);
  }

  window.ThemeCallers = {
    petProcessorCallAPI,
    petProcessorUploadToGCS,
    petProcessorUploadOriginal,
    inlinePreviewUploadEffect,
    inlinePreviewUploadOriginal,
    stitchUploadToServer,
    petProcessorResegment,
    inlinePreviewRemoveBackground,
    APIClient,
    show,
    transparency,
  };
})();
