# Edge protection for the API backend (the CDN path serves immutable files and is not throttled).
# The service's own per-IP limiter (slowapi) stays as the second line: Cloud Armor counts per edge
# location and acts within seconds, the service counts exactly.
resource "google_compute_security_policy" "api" {
  name        = "${local.name}-api"
  description = "Cutout API: per-client-IP throttle, Log4Shell probes refused"
  type        = "CLOUD_ARMOR"

  # Throttle each client IP: past the threshold within the interval, further requests get 429 until
  # the rate falls back under it.
  rule {
    action      = "throttle"
    priority    = 1000
    description = "Per-IP request throttle"
    match {
      versioned_expr = "SRC_IPS_V1"
      config {
        src_ip_ranges = ["*"]
      }
    }
    rate_limit_options {
      conform_action = "allow"
      exceed_action  = "deny(429)"
      enforce_on_key = "IP"
      rate_limit_threshold {
        count        = var.armor_rate_limit.count
        interval_sec = var.armor_rate_limit.interval_sec
      }
    }
  }

  # The service is Python, but scanners send JNDI lookups to everything; refusing them at the edge
  # keeps them out of the logs and off the GPU instances.
  rule {
    action      = "deny(403)"
    priority    = 900
    description = "CVE-2021-44228 / CVE-2021-45046 probes"
    match {
      expr {
        expression = "evaluatePreconfiguredWaf('cve-canary')"
      }
    }
  }

  rule {
    action      = "allow"
    priority    = 2147483647
    description = "Default: allow"
    match {
      versioned_expr = "SRC_IPS_V1"
      config {
        src_ip_ranges = ["*"]
      }
    }
  }

  depends_on = [google_project_service.enabled]
}
