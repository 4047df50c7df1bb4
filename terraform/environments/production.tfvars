# Production: scales to zero outside business hours, kept warm by the warmup job during them.
# project_id, domain, billing_account_id, github_repository and the notification channels are yours
# to fill in.
project_id         = "cutout-production"
environment        = "production"
region             = "us-central1"
domain             = "cutout.example.com"
billing_account_id = "000000-000000-000000"
github_repository  = "example-org/cutout"

# The storefront in production (the theme's own shop domains) and its theme previews.
allowed_origins      = ["https://perkieprints.com", "https://www.perkieprints.com", "https://perkie-prints.myshopify.com"]
allowed_origin_regex = "https://[a-z0-9-]+\\.shopifypreview\\.com"

min_instances                 = 0
max_instances                 = 4
concurrency                   = 8
request_timeout_s             = 300
cpu                           = 8
memory_gib                    = 32
gpu_zonal_redundancy_disabled = false
deletion_protection           = true

# Cloud Run L4 quota granted in the region: at least 2 x max_instances (a canary and the
# serving revision can each scale to max_instances during a release).
gpu_quota = 8

# Processed photos held for an order to keep by hash (kept pictures live by their own dates).
upload_retention_days = 7
result_retention_days = 30

armor_rate_limit = {
  count        = 120
  interval_sec = 60
}

warmup_schedule  = "*/10 8-19 * * 1-5"
warmup_time_zone = "America/New_York"
warmup_paused    = false

# projects/<project>/notificationChannels/<id> (create e-mail / Slack / PagerDuty channels first);
# required outside development. Replace this placeholder with yours.
notification_channel_ids = ["projects/cutout-production/notificationChannels/0000000000000000000"]
monthly_budget_usd       = 1500

alert_thresholds = {
  p95_latency_ms         = 20000
  error_ratio            = 0.02
  instance_count         = 3
  p95_startup_latency_ms = 180000
  min_cache_hit_ratio    = 0.2
}
