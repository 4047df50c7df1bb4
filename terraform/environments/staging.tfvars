# Staging: same shape as production, cheaper capacity, scales to zero, no warm instance.
# project_id, domain, billing_account_id, github_repository, gpu_quota and the notification channel
# are yours to fill in.
project_id         = "cutout-staging"
environment        = "staging"
region             = "us-central1"
domain             = "cutout-staging.example.com"
billing_account_id = "000000-000000-000000"
github_repository  = "example-org/cutout"

allowed_origins      = ["https://perkie-prints-test.myshopify.com"]
allowed_origin_regex = "https://[a-z0-9-]+\\.shopifypreview\\.com"

min_instances                 = 0
max_instances                 = 1
concurrency                   = 8
request_timeout_s             = 300
cpu                           = 8
memory_gib                    = 32
gpu_zonal_redundancy_disabled = true
deletion_protection           = false

# Cloud Run L4 quota granted in the region: at least 2 x max_instances (a canary and the
# serving revision can each scale to max_instances during a release).
gpu_quota = 2

# Processed photos held for an order to keep by hash (kept pictures live by their own dates).
upload_retention_days = 3
result_retention_days = 7

armor_rate_limit = {
  count        = 60
  interval_sec = 60
}

# Staging is warmed by hand (or by a deploy); the job exists but is paused.
warmup_paused = true

# Required outside development: replace this placeholder with your channel.
notification_channel_ids = ["projects/cutout-staging/notificationChannels/0000000000000000000"]
monthly_budget_usd       = 300

alert_thresholds = {
  p95_latency_ms         = 30000
  error_ratio            = 0.05
  instance_count         = 1
  p95_startup_latency_ms = 200000
  min_cache_hit_ratio    = 0.05
}
