# Every knob of a Cutout environment. Values per environment live in environments/<name>.tfvars.

# ---------------------------------------------------------------- project

variable "project_id" {
  description = "GCP project that holds this environment (one project per environment)."
  type        = string
}

variable "environment" {
  description = "development, staging or production; passed to the service as CUTOUT_ENVIRONMENT. Only development may run without notification channels."
  type        = string

  validation {
    condition     = contains(["development", "staging", "production"], var.environment)
    error_message = "environment must be development, staging or production."
  }
}

variable "region" {
  description = "Region of the Cloud Run service, the bucket, the repository and the scheduler job. It must offer L4 GPUs on Cloud Run."
  type        = string
  default     = "us-central1"

  validation {
    # Regions where Cloud Run documents L4 GPUs (asia-south1 is by invitation).
    condition     = contains(["us-central1", "us-east4", "europe-west1", "europe-west4", "asia-southeast1", "asia-south1"], var.region)
    error_message = "Cloud Run L4 GPUs are offered in us-central1, us-east4, europe-west1, europe-west4, asia-southeast1 and asia-south1."
  }
}

variable "service_name" {
  description = "Name of the Cloud Run service; also prefixes the other resources. At most 23 characters: the longest derived service account id, <name>-warmup / <name>-deploy, must stay within IAM's 30, and the buckets <project_id>-<name>-results / -build within Cloud Storage's 63."
  type        = string
  default     = "cutout"

  validation {
    # Service account ids: 6-30 characters, [a-z][a-z0-9-]*[a-z0-9]; "-warmup" and "-deploy" add 7.
    condition     = can(regex("^[a-z][a-z0-9-]{0,21}[a-z0-9]$", var.service_name))
    error_message = "service_name must be 2-23 lowercase letters, digits or hyphens, starting with a letter and ending with a letter or digit (so <name>-warmup fits a 30-character service account id)."
  }
  validation {
    # Bucket names are at most 63 characters; "-results" is the longest suffix used.
    condition     = length("${var.project_id}-${var.service_name}-results") <= 63
    error_message = "project_id and service_name together are too long: the bucket name <project_id>-<service_name>-results must not exceed 63 characters."
  }
}

variable "domain" {
  description = "Public host name (for example cutout.example.com). The managed certificate is issued for it once its A record points at the load balancer address (output lb_ip_address)."
  type        = string
}

variable "dns_managed_zone" {
  description = "Optional Cloud DNS managed zone (in this project) that serves var.domain; when set, the A record is created here. Leave empty to create it at your DNS provider."
  type        = string
  default     = ""
}

# ---------------------------------------------------------------- Cloud Run

variable "image" {
  description = "Image of the first revision only. Later revisions are deployed by scripts/deploy.py (the image is ignored by Terraform after creation). The default is Google's hello container, which answers 200 on every path, so a first apply works before the first build."
  type        = string
  default     = "us-docker.pkg.dev/cloudrun/container/hello"
}

variable "ingress" {
  description = "Cloud Run ingress. INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER (the default) admits only the load balancer and internal sources (Cloud Scheduler in this project), so every browser request passes Cloud Armor and the client IP is always the 2nd X-Forwarded-For entry from the right; releases smoke-test the canary through the load balancer's /canary/ route. INGRESS_TRAFFIC_ALL also opens the run.app URLs, which bypass Cloud Armor (docs/deployment.md)."
  type        = string
  default     = "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER"

  validation {
    condition     = contains(["INGRESS_TRAFFIC_ALL", "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER"], var.ingress)
    error_message = "ingress must be INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER or INGRESS_TRAFFIC_ALL."
  }
}

variable "min_instances" {
  description = "Minimum instances. 0 lets the service scale to zero (no GPU bill when idle); each warm instance costs the full GPU rate around the clock (docs/cost.md)."
  type        = number
  default     = 0

  validation {
    condition     = var.min_instances >= 0 && floor(var.min_instances) == var.min_instances
    error_message = "min_instances must be a whole number >= 0."
  }
}

variable "max_instances" {
  description = "Maximum instances per revision: the cost cap in steady state. Each instance holds one L4. During a release the canary revision and the serving one each scale up to this, so the region's L4 quota (gpu_quota) must cover twice it."
  type        = number
  default     = 3

  validation {
    condition     = var.max_instances >= 1 && floor(var.max_instances) == var.max_instances
    error_message = "max_instances must be a whole number >= 1."
  }
}

variable "gpu_quota" {
  description = "The project's Cloud Run L4 quota in the region, as granted (with zonal redundancy, or without it when gpu_zonal_redundancy_disabled). Quota counts every instance of every revision and service in the region; during a canary two revisions each scale up to max_instances, so it must be at least 2 x max_instances (docs/deployment.md, What you need)."
  type        = number

  validation {
    condition     = var.gpu_quota >= 2 * var.max_instances
    error_message = "gpu_quota must be at least 2 x max_instances: during a release the canary and the serving revision each hold up to max_instances L4s, and GPU quota counts them all."
  }
}

variable "concurrency" {
  description = "Requests one instance takes at once. The engine micro-batches masks across them; CUTOUT_MAX_QUEUE bounds what waits for the GPU."
  type        = number
  default     = 8

  validation {
    condition     = var.concurrency >= 1 && var.concurrency <= 1000 && floor(var.concurrency) == var.concurrency
    error_message = "Cloud Run allows a request concurrency of 1 to 1000."
  }
}

variable "request_timeout_s" {
  description = "Cloud Run request timeout in seconds. The service's own CUTOUT_REQUEST_TIMEOUT_S is set 10 s below it so it answers before Cloud Run cuts the connection."
  type        = number
  default     = 300

  validation {
    condition     = var.request_timeout_s >= 30 && var.request_timeout_s <= 3600
    error_message = "request_timeout_s must be between 30 and 3600 (Cloud Run's maximum request timeout)."
  }
}

variable "cpu" {
  description = "vCPUs per instance. Cloud Run requires at least 4 with an L4."
  type        = number
  default     = 8

  validation {
    condition     = contains([4, 6, 8], var.cpu)
    error_message = "With an L4 GPU, cpu must be 4, 6 or 8."
  }
}

variable "memory_gib" {
  description = "Memory per instance in GiB. Cloud Run requires at least 16 GiB with an L4, and allows at most 4 GiB per vCPU (4 vCPU: up to 16 GiB, 6: up to 24, 8: up to 32); the weights are read through the page cache while loading, so 32 GiB leaves room."
  type        = number
  default     = 32

  validation {
    condition     = var.memory_gib >= 16 && var.memory_gib <= 32 && floor(var.memory_gib) == var.memory_gib
    error_message = "memory_gib must be a whole number from 16 (Cloud Run's minimum with a GPU) to 32."
  }
  validation {
    # Cloud Run's CPU/memory table: more than 16 GiB needs 6 vCPU, more than 24 GiB needs 8.
    condition     = var.memory_gib <= var.cpu * 4
    error_message = "memory_gib exceeds what Cloud Run allows for this cpu: at most 16 GiB with 4 vCPU, 24 GiB with 6, 32 GiB with 8."
  }
}

variable "gpu_zonal_redundancy_disabled" {
  description = "true buys L4 capacity without zonal redundancy: cheaper per GPU-second, best-effort failover if a zone fails (docs/cost.md)."
  type        = bool
  default     = false
}

variable "startup_probe" {
  description = "HTTP startup probe on /ready, which answers 200 once the cutout model is warm. Cloud Run caps failure_threshold x period_seconds at 240 s and initial_delay_seconds at 240 s; timeout_seconds may not exceed period_seconds. The budget (initial delay + threshold x period) must cover an L4 cold start of the cutout stage."
  type = object({
    initial_delay_seconds = number
    period_seconds        = number
    timeout_seconds       = number
    failure_threshold     = number
  })
  # 120 x 2 s = 240 s (Cloud Run's most), far above the ~13-15 s an L4 cold start of the cutout stage
  # is estimated to take (docs/capacity.md, "Cold start": imports, 0.2 GB of weights, one warm forward;
  # /ready does not wait for the diffusion pipelines). Probed every 2 s so an instance takes traffic
  # within 2 s of the cutout model being warm; a probe that times out while the process is busy
  # importing only spends one of the 120 tries.
  default = {
    initial_delay_seconds = 0
    period_seconds        = 2
    timeout_seconds       = 2
    failure_threshold     = 120
  }

  validation {
    condition     = var.startup_probe.failure_threshold * var.startup_probe.period_seconds <= 240
    error_message = "startup_probe.failure_threshold x startup_probe.period_seconds must not exceed 240 seconds (Cloud Run's limit)."
  }
  validation {
    condition     = var.startup_probe.initial_delay_seconds >= 0 && var.startup_probe.initial_delay_seconds <= 240
    error_message = "startup_probe.initial_delay_seconds must be between 0 and 240."
  }
  validation {
    condition     = var.startup_probe.timeout_seconds >= 1 && var.startup_probe.timeout_seconds <= var.startup_probe.period_seconds
    error_message = "startup_probe.timeout_seconds must be at least 1 and not exceed period_seconds."
  }
}

variable "deletion_protection" {
  description = "Refuse `terraform destroy` of the service and the results bucket."
  type        = bool
  default     = true
}

# ---------------------------------------------------------------- service settings (CUTOUT_*)

variable "cutout_model" {
  description = "CUTOUT_CUTOUT_MODEL: folder of the cutout model inside MODELS_DIR. Must be one the image was built with."
  type        = string
  default     = "inspyrenet-swinb"
}

variable "diffusion_effects" {
  description = "CUTOUT_DIFFUSION_EFFECTS: diffusion effects to load (their weights are in the image)."
  type        = list(string)
  default     = ["upscale", "enhance", "comic", "aged"]

  validation {
    condition     = alltrue([for effect in var.diffusion_effects : contains(["upscale", "enhance", "comic", "aged"], effect)])
    error_message = "diffusion_effects may only name upscale, enhance, comic and aged."
  }
}

variable "allowed_origins" {
  description = "CUTOUT_ALLOWED_ORIGINS: the storefront origins browsers call the API from."
  type        = list(string)
}

variable "allowed_origin_regex" {
  description = "CUTOUT_ALLOWED_ORIGIN_REGEX: a pattern matched against the whole Origin, for origins that cannot be listed (Shopify theme previews); empty for none."
  type        = string
  default     = ""
}

variable "max_upload_bytes" {
  description = "CUTOUT_MAX_UPLOAD_BYTES: larger bodies get 413 before being read. Cloud Run itself caps HTTP/1 request bodies at 32 MiB."
  type        = number
  default     = 26214400

  validation {
    condition     = var.max_upload_bytes >= 1024 && var.max_upload_bytes <= 33554432
    error_message = "max_upload_bytes must be between 1 KiB and 32 MiB (Cloud Run's HTTP/1 request size limit)."
  }
}

variable "max_pixels" {
  description = "CUTOUT_MAX_PIXELS: larger images get 413 before being decoded."
  type        = number
  default     = 50000000
}

variable "max_queue" {
  description = "CUTOUT_MAX_QUEUE: requests an instance admits beyond those running before answering 503 with Retry-After."
  type        = number
  default     = 32
}

variable "trusted_proxy_hops" {
  description = "CUTOUT_TRUSTED_PROXY_HOPS: X-Forwarded-For entries appended by infrastructure we trust. The global external Application Load Balancer appends `<client-ip>,<load-balancer-ip>`, and Cloud Run adds nothing behind a serverless NEG, so the client is the 2nd entry from the right (docs/deployment.md)."
  type        = number
  default     = 2
}

variable "shutdown_grace_s" {
  description = "CUTOUT_SHUTDOWN_GRACE_S: how long the service drains after SIGTERM. Cloud Run sends SIGKILL 10 s after SIGTERM."
  type        = number
  default     = 8

  validation {
    condition     = var.shutdown_grace_s >= 1 && var.shutdown_grace_s < 10
    error_message = "shutdown_grace_s must be below Cloud Run's 10 s SIGTERM grace period."
  }
}

# ---------------------------------------------------------------- results bucket and CDN

variable "result_retention_days" {
  description = "Results and cached masks are deleted from the bucket this many days after they were written (the CDN may keep serving a copy until its TTL ends; the service re-renders identical bytes on a miss)."
  type        = number
  default     = 30

  validation {
    condition     = var.result_retention_days >= 1
    error_message = "result_retention_days must be at least 1."
  }
}

variable "cdn_ttl_s" {
  description = "How long Cloud CDN and browsers keep a result. Results are content-addressed and immutable, so this can be long."
  type        = number
  default     = 2592000

  validation {
    condition     = var.cdn_ttl_s >= 60 && var.cdn_ttl_s <= 31536000
    error_message = "cdn_ttl_s must be between 60 seconds and one year."
  }
}

# ---------------------------------------------------------------- Cloud Armor

variable "armor_rate_limit" {
  description = "Per-client-IP throttle at the edge: at most `count` requests per `interval_sec` to the service (the CDN path is not throttled); the excess gets 429."
  type = object({
    count        = number
    interval_sec = number
  })
  default = {
    count        = 120
    interval_sec = 60
  }

  validation {
    condition     = contains([10, 30, 60, 120, 180, 240, 300, 600, 900, 1200, 1800, 2700, 3600], var.armor_rate_limit.interval_sec)
    error_message = "Cloud Armor rate limit intervals are 10, 30, 60, 120, 180, 240, 300, 600, 900, 1200, 1800, 2700 or 3600 seconds."
  }
}

# ---------------------------------------------------------------- warmup

variable "warmup_schedule" {
  description = "Cron (in warmup_time_zone) on which Cloud Scheduler POSTs /warmup. Every 10 minutes keeps one instance warm, since Cloud Run may stop an idle instance after about 15 minutes."
  type        = string
  default     = "*/10 8-19 * * 1-5"
}

variable "warmup_time_zone" {
  description = "Time zone of warmup_schedule (IANA name): the storefront's business hours."
  type        = string
  default     = "America/New_York"
}

variable "warmup_paused" {
  description = "Create the warmup job paused (no warm instance during business hours)."
  type        = bool
  default     = false
}

# ---------------------------------------------------------------- monitoring and budget

variable "notification_channel_ids" {
  description = "Cloud Monitoring notification channels (projects/<p>/notificationChannels/<id>) for alerts and the budget (the budget takes at most 5). Required outside development: an alert nobody receives protects nothing."
  type        = list(string)
  default     = []

  validation {
    condition     = length(var.notification_channel_ids) <= 5
    error_message = "A billing budget accepts at most 5 notification channels."
  }
  validation {
    condition     = var.environment == "development" || length(var.notification_channel_ids) >= 1
    error_message = "staging and production need at least one notification channel (create one under Monitoring > Alerting > Edit notification channels)."
  }
  validation {
    condition     = alltrue([for channel in var.notification_channel_ids : can(regex("^projects/[^/]+/notificationChannels/[^/]+$", channel))])
    error_message = "notification_channel_ids must be full names: projects/<project>/notificationChannels/<id>."
  }
}

variable "alert_thresholds" {
  description = "Alert thresholds: p95 request latency (ms), 5xx ratio, instance count (cost), p95 startup latency (ms), minimum cache hit ratio."
  type = object({
    p95_latency_ms         = number
    error_ratio            = number
    instance_count         = number
    p95_startup_latency_ms = number
    min_cache_hit_ratio    = number
  })
  default = {
    p95_latency_ms         = 20000
    error_ratio            = 0.02
    instance_count         = 2
    p95_startup_latency_ms = 180000
    min_cache_hit_ratio    = 0.2
  }
}

variable "billing_account_id" {
  description = "Billing account of the project (XXXXXX-XXXXXX-XXXXXX), for the budget."
  type        = string
}

variable "monthly_budget_usd" {
  description = "Monthly budget for the project in USD."
  type        = number
}

variable "budget_alert_thresholds" {
  description = "Fractions of the budget at which actual spend alerts."
  type        = list(number)
  default     = [0.5, 0.9, 1.0]
}

# ---------------------------------------------------------------- GitHub deploys

variable "github_repository" {
  description = "owner/name of the GitHub repository whose Actions may deploy; the Workload Identity provider accepts tokens from this repository only."
  type        = string

  validation {
    condition     = can(regex("^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$", var.github_repository))
    error_message = "github_repository must look like owner/name."
  }
}

# ---------------------------------------------------------------- kept pictures (storage.tf)

variable "upload_retention_days" {
  description = "Days a processed photo is held under uploads/ so an order can keep it by its sha256 (POST /v1/keep with image_sha256); after that the photo must be sent again."
  type        = number
  default     = 7

  validation {
    condition     = var.upload_retention_days >= 1 && floor(var.upload_retention_days) == var.upload_retention_days
    error_message = "upload_retention_days must be a whole number of days, 1 or more."
  }
}

variable "kept_max_age_days" {
  description = "Backstop: a kept picture (kept/) is deleted this many days after it was last written, whatever its keep-until date. Longer than the longest tier (archived, 730 days); the service (CUTOUT_KEPT_MAX_AGE_DAYS, same default) renews an object whose keep needs longer."
  type        = number
  default     = 1095

  validation {
    condition     = var.kept_max_age_days >= 732 && floor(var.kept_max_age_days) == var.kept_max_age_days
    error_message = "kept_max_age_days must be a whole number of days, at least 732 (the archived tier plus the lifecycle's day of grace)."
  }
}
