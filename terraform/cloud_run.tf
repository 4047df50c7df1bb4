# The service: one container, one NVIDIA L4, instance-based billing (CPU always allocated, which Cloud
# Run requires with a GPU), scaling to zero.
#
# Who owns what (one owner each, so Terraform and releases never undo each other):
#   Terraform            the revision template: env, secrets, scaling, CPU/memory, probes, identity
#                        (everything but the image);
#   scripts/deploy.py    the image, the traffic split and the revision tags.
# `gcloud run deploy --image` copies every other setting from the current template, so a release ships
# whatever Terraform last set. A Terraform change creates a revision that gets no traffic once a
# release has pinned traffic to a named revision: it goes live with the next release, canary and all
# (docs/deployment.md, "Who owns the service"). Hence the ignore_changes below.
resource "google_cloud_run_v2_service" "cutout" {
  name                = local.name
  location            = var.region
  ingress             = var.ingress
  deletion_protection = var.deletion_protection
  labels              = local.labels

  # Browsers call the API anonymously through the load balancer; the service authenticates what needs
  # it (POST /warmup) itself. Disabling the invoker check avoids an allUsers IAM binding, which
  # domain-restricted-sharing org policies forbid; ingress (INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER by
  # default) is what keeps the run.app URLs from being a way around Cloud Armor.
  invoker_iam_disabled = true

  template {
    service_account                  = google_service_account.runtime.email
    timeout                          = "${var.request_timeout_s}s"
    max_instance_request_concurrency = var.concurrency
    execution_environment            = "EXECUTION_ENVIRONMENT_GEN2"
    gpu_zonal_redundancy_disabled    = var.gpu_zonal_redundancy_disabled
    labels                           = local.labels

    scaling {
      min_instance_count = var.min_instances
      max_instance_count = var.max_instances
    }

    node_selector {
      accelerator = "nvidia-l4"
    }

    containers {
      name  = "cutout"
      image = var.image

      ports {
        container_port = 8080
      }

      resources {
        limits = {
          cpu              = tostring(var.cpu)
          memory           = "${var.memory_gib}Gi"
          "nvidia.com/gpu" = "1"
        }
        # CPU always allocated (instance-based billing): required with a GPU, and lets the engine keep
        # working between requests (batching, result uploads, metric export).
        cpu_idle = false
        # Extra CPU while the container starts: model loading is the cold start.
        startup_cpu_boost = true
      }

      # Traffic only once every configured model is loaded (GET /ready answers 503 until then).
      startup_probe {
        initial_delay_seconds = var.startup_probe.initial_delay_seconds
        period_seconds        = var.startup_probe.period_seconds
        timeout_seconds       = var.startup_probe.timeout_seconds
        failure_threshold     = var.startup_probe.failure_threshold
        http_get {
          path = "/ready"
          port = 8080
        }
      }

      # Restart an instance whose process stopped answering (a wedged event loop), not one that is
      # merely busy: /health does no GPU work. It starts after the startup probe passed, while the
      # diffusion pipelines may still be loading in the background, so it tolerates slow answers:
      # four misses in a row, 30 s apart, 10 s each (about two minutes of silence) before a restart.
      liveness_probe {
        period_seconds    = 30
        timeout_seconds   = 10
        failure_threshold = 4
        http_get {
          path = "/health"
          port = 8080
        }
      }

      dynamic "env" {
        for_each = local.service_env
        content {
          name  = env.key
          value = env.value
        }
      }

      # "latest", resolved when an instance starts: no revision pins a version, so rotating the token
      # (secrets.tf) never leaves a serving or rolled-back-to revision pointing at a version that was
      # disabled, and it does not create a revision. The version resource is created before the old
      # one is disabled (create_before_destroy), so "latest" always resolves.
      env {
        name = "CUTOUT_WARMUP_TOKEN"
        value_source {
          secret_key_ref {
            secret  = google_secret_manager_secret.warmup_token.secret_id
            version = "latest"
          }
        }
      }
    }
  }

  traffic {
    type    = "TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST"
    percent = 100
  }

  lifecycle {
    # Releases (scripts/deploy.py) own the image, the revision names, the traffic split and the tags.
    ignore_changes = [
      template[0].containers[0].image,
      template[0].revision,
      traffic,
      client,
      client_version,
    ]

    precondition {
      condition     = var.min_instances <= var.max_instances
      error_message = "min_instances must not exceed max_instances."
    }
  }

  # The first revision resolves the token's "latest" version at start: it must exist and be readable.
  depends_on = [
    google_project_service.enabled,
    google_secret_manager_secret_version.warmup_token,
    google_secret_manager_secret_iam_member.runtime_reads_warmup_token,
  ]
}

locals {
  # What one instance costs per second at list price in Tier 1 regions (docs/cost.md); the service
  # multiplies it by the device seconds of each image (GPU time, waits excluded) for cost_per_image_usd.
  l4_usd_per_second       = var.gpu_zonal_redundancy_disabled ? 0.0001867 : 0.0002909
  instance_usd_per_second = local.l4_usd_per_second + var.cpu * 0.000018 + var.memory_gib * 0.000002

  # Every CUTOUT_* setting (service/settings.py) the environment decides. HOST=0.0.0.0, PORT and
  # CUTOUT_MODELS_DIR=/models come from the image; Cloud Run sets PORT.
  service_env = {
    CUTOUT_ENVIRONMENT            = var.environment
    CUTOUT_DEVICE                 = "cuda"
    CUTOUT_MODELS_DIR             = "/models"
    CUTOUT_CUTOUT_MODEL           = var.cutout_model
    CUTOUT_DIFFUSION_EFFECTS      = jsonencode(var.diffusion_effects)
    CUTOUT_CACHE_BACKEND          = "gcs"
    CUTOUT_GCS_BUCKET             = google_storage_bucket.results.name
    CUTOUT_CDN_URL                = local.pub_url
    CUTOUT_PUBLIC_URL             = local.pub_url
    CUTOUT_MAX_UPLOAD_BYTES       = tostring(var.max_upload_bytes)
    CUTOUT_MAX_PIXELS             = tostring(var.max_pixels)
    CUTOUT_MAX_QUEUE              = tostring(var.max_queue)
    CUTOUT_ALLOWED_ORIGINS        = jsonencode(var.allowed_origins)
    CUTOUT_ALLOWED_ORIGIN_REGEX   = var.allowed_origin_regex
    CUTOUT_TRUSTED_PROXY_HOPS     = tostring(var.trusted_proxy_hops)
    CUTOUT_REQUEST_TIMEOUT_S      = tostring(var.request_timeout_s - 10)
    CUTOUT_SHUTDOWN_GRACE_S       = tostring(var.shutdown_grace_s)
    CUTOUT_WARMUP_AUDIENCE        = local.warmup_audience
    CUTOUT_WARMUP_SERVICE_ACCOUNT = google_service_account.warmup.email
    CUTOUT_TRACE_EXPORT           = "cloud_trace"
    CUTOUT_METRICS_EXPORT         = "cloud_monitoring"
    CUTOUT_GCP_PROJECT            = var.project_id
    CUTOUT_GCP_REGION             = var.region
    CUTOUT_L4_USD_PER_SECOND      = tostring(local.instance_usd_per_second)
  }
}
