/*
 * Cutout storefront client: no build step, no dependencies. Load it with
 *
 *   <script src="https://CUTOUT_HOST/static/cutout.js" defer></script>
 *
 * and use `window.Cutout`:
 *
 *   const cutout = Cutout.create({ apiBase: "https://CUTOUT_HOST", effects: ["cutout", "blackwhite"] });
 *   const outcome = await cutout.process(file, { onProgress: (p) => console.log(p.stage, p.fraction) });
 *   await Cutout.renderPreviews(container, outcome);
 *
 * What it does for a photo:
 *  1. resizes it in the browser to `maxSide` (long side) and re-encodes it, which also drops its
 *     EXIF block (camera, GPS) and applies its orientation;
 *  2. hashes the resized bytes (SHA-256, WebCrypto): the same photo in the same browser always
 *     gives the same bytes, so the same hash;
 *  3. asks the service for the results of that hash (`image_sha256`); when every result is
 *     stored the photo is never uploaded again (a repeat photo costs one small request);
 *  4. otherwise uploads it, reporting upload progress;
 *  5. retries 429 and 503 answers after their `Retry-After` (seconds or an HTTP date), capped,
 *     a bounded number of times.
 * `Cutout.create` also sends a cheap `GET /health` at once (`wake: false` to skip it), so a
 * service scaled to zero starts while the customer is still choosing a photo.
 */
(function (root) {
  "use strict";

  var DEFAULTS = {
    apiBase: "", // the service's origin, e.g. "https://cutout.example.com"; "" means this page's origin
    effects: ["cutout"],
    background: "transparent",
    format: "png",
    maxSide: 2048, // long side of the uploaded photo, in pixels
    jpegQuality: 0.92,
    maxSize: null, // longest output side (the service's max_size); null: the service's default
    params: null, // {"<effect>": {<param>: <value>}}
    seed: null,
    maxRetries: 3,
    maxRetryDelayMs: 20000,
    timeoutMs: 180000,
    wake: true,
    onProgress: null,
  };
  var RETRIED_STATUSES = [429, 503];
  // PNG, WebP and GIF may carry transparency; everything else is re-encoded as JPEG.
  var KEEPS_ALPHA = /^image\/(png|webp|gif)$/i;

  /** An answer from the service that is not a success, in the API's `{detail, code}` terms. */
  function CutoutError(status, code, detail, retryAfterMs) {
    var error = new Error(detail);
    Object.setPrototypeOf(error, CutoutError.prototype);
    error.name = "CutoutError";
    error.status = status;
    error.code = code;
    error.detail = detail;
    error.retryAfterMs = retryAfterMs;
    return error;
  }
  CutoutError.prototype = Object.create(Error.prototype);
  CutoutError.prototype.constructor = CutoutError;

  function assign(target) {
    for (var i = 1; i < arguments.length; i++) {
      var source = arguments[i] || {};
      for (var key in source) {
        if (Object.prototype.hasOwnProperty.call(source, key) && source[key] !== undefined) target[key] = source[key];
      }
    }
    return target;
  }

  function sleep(ms) {
    return new Promise(function (resolve) {
      setTimeout(resolve, ms);
    });
  }

  /** Milliseconds to wait from a Retry-After value (delta-seconds or an HTTP date); NaN if absent or invalid. */
  function parseRetryAfter(value, now) {
    if (value == null || String(value).trim() === "") return NaN;
    var text = String(value).trim();
    if (/^\d+(\.\d+)?$/.test(text)) return Number(text) * 1000;
    var when = Date.parse(text);
    return isNaN(when) ? NaN : Math.max(0, when - (now === undefined ? Date.now() : now));
  }

  function retryDelay(retryAfter, attempt, capMs) {
    var ms = parseRetryAfter(retryAfter);
    if (!(ms >= 0)) ms = 1000 * Math.pow(2, attempt); // no usable header: back off exponentially
    // A little jitter, so the browsers refused together do not all come back in the same instant.
    return Math.min(ms, capMs) + Math.floor(Math.random() * 200);
  }

  function toHex(buffer) {
    var bytes = new Uint8Array(buffer);
    var out = "";
    for (var i = 0; i < bytes.length; i++) out += (bytes[i] < 16 ? "0" : "") + bytes[i].toString(16);
    return out;
  }

  /** SHA-256 of a blob's bytes in hex, or null where WebCrypto is unavailable (not a secure context). */
  function sha256Hex(blob) {
    var subtle = root.crypto && root.crypto.subtle;
    if (!subtle) return Promise.resolve(null);
    return blob.arrayBuffer().then(function (bytes) {
      return subtle.digest("SHA-256", bytes).then(toHex);
    });
  }

  function canvasToBlob(canvas, type, quality) {
    return new Promise(function (resolve, reject) {
      canvas.toBlob(
        function (blob) {
          if (blob) resolve(blob);
          else reject(new Error("the browser could not encode the resized photo"));
        },
        type,
        quality
      );
    });
  }

  /**
   * The bytes to upload: the photo drawn at most `maxSide` pixels on its long side, re-encoded.
   * Drawing and encoding are deterministic in a given browser, so the same file gives the same
   * bytes (and hash) on every visit. A photo the browser cannot decode (HEIC outside Safari)
   * is sent as it is; the service decodes it.
   */
  function preparePhoto(file, options) {
    if (typeof root.createImageBitmap !== "function") {
      return Promise.resolve({ blob: file, width: null, height: null, resized: false });
    }
    return root.createImageBitmap(file, { imageOrientation: "from-image" }).then(
      function (bitmap) {
        var scale = Math.min(1, options.maxSide / Math.max(bitmap.width, bitmap.height));
        var width = Math.max(1, Math.round(bitmap.width * scale));
        var height = Math.max(1, Math.round(bitmap.height * scale));
        var canvas = document.createElement("canvas");
        canvas.width = width;
        canvas.height = height;
        var context = canvas.getContext("2d");
        context.imageSmoothingEnabled = true;
        context.imageSmoothingQuality = "high";
        context.drawImage(bitmap, 0, 0, width, height);
        if (bitmap.close) bitmap.close();
        var type = KEEPS_ALPHA.test(file.type || "") ? "image/png" : "image/jpeg";
        return canvasToBlob(canvas, type, options.jpegQuality).then(function (blob) {
          return { blob: blob, width: width, height: height, resized: scale < 1 };
        });
      },
      function () {
        return { blob: file, width: null, height: null, resized: false };
      }
    );
  }

  /** One POST with XMLHttpRequest (fetch cannot report upload progress). Resolves with every status. */
  function post(url, form, options, onUploadProgress) {
    return new Promise(function (resolve, reject) {
      var xhr = new XMLHttpRequest();
      xhr.open("POST", url, true);
      xhr.timeout = options.timeoutMs;
      xhr.responseType = "text";
      if (onUploadProgress && xhr.upload) {
        xhr.upload.onprogress = function (event) {
          if (event.lengthComputable) onUploadProgress(event.loaded, event.total);
        };
      }
      xhr.onload = function () {
        var body = null;
        try {
          body = xhr.responseText ? JSON.parse(xhr.responseText) : null;
        } catch (ignored) {
          body = { detail: xhr.responseText, code: "unexpected_response" };
        }
        resolve({ status: xhr.status, body: body, retryAfter: xhr.getResponseHeader("Retry-After") });
      };
      xhr.onerror = function () {
        reject(
          CutoutError(0, "network_error", "could not reach the Cutout service (network down, or the origin is not allowed by CORS)")
        );
      };
      xhr.ontimeout = function () {
        reject(CutoutError(0, "timeout", "the Cutout service did not answer in " + options.timeoutMs / 1000 + " s"));
      };
      xhr.send(form);
    });
  }

  function errorFrom(response) {
    var body = response.body || {};
    return CutoutError(
      response.status,
      body.code || "http_" + response.status,
      typeof body.detail === "string" ? body.detail : "the Cutout service answered " + response.status,
      parseRetryAfter(response.retryAfter)
    );
  }

  function create(userOptions) {
    var options = assign({}, DEFAULTS, userOptions);
    var apiBase = String(options.apiBase || "").replace(/\/+$/, "");
    var woken = null;

    function url(path) {
      return apiBase + path;
    }

    function report(callback, progress) {
      if (typeof callback === "function") {
        try {
          callback(progress);
        } catch (error) {
          if (root.console) root.console.error("Cutout onProgress failed", error);
        }
      }
    }

    function requestForm(settings) {
      var form = new FormData();
      form.append("effects", [].concat(settings.effects).join(","));
      form.append("background", settings.background);
      form.append("format", settings.format);
      if (settings.maxSize != null) form.append("max_size", String(settings.maxSize));
      if (settings.params != null) form.append("params", JSON.stringify(settings.params));
      if (settings.seed != null) form.append("seed", String(settings.seed));
      return form;
    }

    /** POST, retrying 429/503 after Retry-After (capped), at most `maxRetries` times. */
    function postWithRetries(form, settings, stage, onUploadProgress, onAttempt) {
      var attempt = 0;
      function tryOnce() {
        if (onAttempt) onAttempt(attempt);
        return post(url("/v1/process"), form, settings, onUploadProgress).then(function (response) {
          if (RETRIED_STATUSES.indexOf(response.status) >= 0 && attempt < settings.maxRetries) {
            var delay = retryDelay(response.retryAfter, attempt, settings.maxRetryDelayMs);
            attempt += 1;
            report(settings.onProgress, {
              stage: "waiting",
              during: stage,
              status: response.status,
              attempt: attempt,
              retryInMs: delay,
            });
            return sleep(delay).then(tryOnce);
          }
          return response;
        });
      }
      return tryOnce();
    }

    function outcome(body, prepared, uploaded) {
      var results = body.results || {};
      Object.keys(results).forEach(function (name) {
        var result = results[name];
        // When the service's store could not keep a result, its `url` is a data: URL carrying the
        // picture itself: shown like any other, but `stored: false` says it is no link to keep
        // (in a cart or an order); ask again later for a stored one.
        result.stored = result.stored !== false && String(result.url).indexOf("data:") !== 0;
      });
      return {
        imageSha256: body.image_sha256,
        results: results,
        timingsMs: body.timings_ms || {},
        uploaded: uploaded,
        photo: { width: prepared.width, height: prepared.height, bytes: prepared.blob.size },
      };
    }

    var client = {
      options: options,

      /** A cheap GET /health so a service scaled to zero starts now; resolves true when it answered. */
      wake: function () {
        if (!woken) {
          woken = root
            .fetch(url("/health"), { method: "GET", mode: "cors", cache: "no-store", credentials: "omit" })
            .then(
              function (response) {
                return response.ok;
              },
              function () {
                woken = null; // a failed wake may be tried again
                return false;
              }
            );
        }
        return woken;
      },

      /** Resize and hash a photo without sending it: `{blob, sha256, width, height}`. */
      prepare: function (file, overrides) {
        var settings = assign({}, options, overrides);
        return preparePhoto(file, settings).then(function (prepared) {
          return sha256Hex(prepared.blob).then(function (hash) {
            prepared.sha256 = hash;
            return prepared;
          });
        });
      },

      /**
       * Every requested effect of one photo: `{imageSha256, results: {<effect>: {url, stored, width, height, ...}},
       * uploaded}`. Every `url` shows the picture; one with `stored: false` is a data: URL (the service could not
       * store that result) to show, not to keep. Rejects with a `CutoutError` carrying the service's `code` and `detail`.
       */
      process: function (file, overrides) {
        var settings = assign({}, options, overrides);
        var progress = settings.onProgress;
        report(progress, { stage: "preparing", fraction: 0 });
        return client.prepare(file, settings).then(function (prepared) {
          var hashFirst = Promise.resolve(null);
          if (prepared.sha256) {
            report(progress, { stage: "checking", fraction: 0.05, sha256: prepared.sha256 });
            var form = requestForm(settings);
            form.append("image_sha256", prepared.sha256);
            hashFirst = postWithRetries(form, settings, "checking").then(function (response) {
              if (response.status === 200) return response;
              if (response.status === 404 && response.body && response.body.code === "image_not_cached") return null;
              throw errorFrom(response);
            });
          }
          return hashFirst.then(function (cached) {
            if (cached) {
              report(progress, { stage: "done", fraction: 1, uploaded: false });
              return outcome(cached.body, prepared, false);
            }
            var form = requestForm(settings);
            form.append("image", prepared.blob, prepared.blob.type === "image/png" ? "photo.png" : "photo.jpg");
            var onUploadProgress = function (loaded, total) {
              report(progress, {
                stage: loaded >= total ? "processing" : "uploading",
                fraction: 0.05 + 0.55 * (total ? loaded / total : 1),
                loaded: loaded,
                total: total,
              });
            };
            var onAttempt = function (attempt) {
              report(progress, { stage: "uploading", fraction: 0.05, loaded: 0, total: prepared.blob.size, attempt: attempt });
            };
            return postWithRetries(form, settings, "uploading", onUploadProgress, onAttempt).then(function (response) {
              if (response.status !== 200) throw errorFrom(response);
              if (prepared.sha256 && response.body.image_sha256 !== prepared.sha256 && root.console) {
                root.console.warn("Cutout: the service hashed the upload differently; repeat photos will upload again");
              }
              report(progress, { stage: "done", fraction: 1, uploaded: true });
              return outcome(response.body, prepared, true);
            });
          });
        });
      },
    };

    if (options.wake) client.wake();
    return client;
  }

  /**
   * Show every result as a labelled image in `container` (its previous content is replaced).
   * Resolves when every image has loaded or failed, with the names of the ones that loaded.
   */
  function renderPreviews(container, outcome, settings) {
    var labels = (settings && settings.labels) || {};
    var names = (settings && settings.order) || Object.keys(outcome.results);
    while (container.firstChild) container.removeChild(container.firstChild);
    var loads = names
      .filter(function (name) {
        return outcome.results[name];
      })
      .map(function (name) {
        var result = outcome.results[name];
        var figure = document.createElement("figure");
        figure.className = "cutout-preview";
        figure.setAttribute("data-effect", name);
        var image = document.createElement("img");
        image.alt = labels[name] || name;
        image.decoding = "async";
        if (result.width && result.height) {
          image.width = result.width;
          image.height = result.height;
        }
        var caption = document.createElement("figcaption");
        caption.textContent = labels[name] || name;
        figure.appendChild(image);
        figure.appendChild(caption);
        container.appendChild(figure);
        var loaded = new Promise(function (resolve) {
          image.onload = function () {
            figure.classList.add("cutout-preview--loaded");
            resolve(name);
          };
          image.onerror = function () {
            figure.classList.add("cutout-preview--failed");
            resolve(null);
          };
        });
        image.src = result.url;
        return loaded;
      });
    return Promise.all(loads).then(function (loadedNames) {
      return loadedNames.filter(Boolean);
    });
  }

  root.Cutout = {
    version: "1.0.0",
    create: create,
    renderPreviews: renderPreviews,
    CutoutError: CutoutError,
    parseRetryAfter: parseRetryAfter,
  };
})(typeof window !== "undefined" ? window : this);
