# During business hours Cloud Scheduler POSTs /warmup, so a storefront customer rarely meets a cold
# start: the first call of the day starts an instance (loading the models), later ones keep it from
# being reclaimed as idle. The call goes to the service's own URL (not through the load balancer), so
# it works before the certificate is provisioned and is never throttled by Cloud Armor. It carries an
# OIDC token signed as the warmup service account for local.warmup_audience, which the service checks.
resource "google_cloud_scheduler_job" "warmup" {
  name        = "${local.name}-warmup"
  region      = var.region
  description = "Keep one Cutout instance warm during business hours"
  schedule    = var.warmup_schedule
  time_zone   = var.warmup_time_zone
  paused      = var.warmup_paused
  # A cold start (models loading) can take minutes; the call waits for the instance to be ready.
  attempt_deadline = "600s"

  retry_config {
    retry_count          = 1
    min_backoff_duration = "30s"
  }

  http_target {
    http_method = "POST"
    uri         = "${google_cloud_run_v2_service.cutout.uri}/warmup"

    oidc_token {
      service_account_email = google_service_account.warmup.email
      audience              = local.warmup_audience
    }
  }

  depends_on = [google_project_service.enabled]
}
