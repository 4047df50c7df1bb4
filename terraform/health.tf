# Is it up, and does anyone hear when it is not: an uptime check on the public URL, and alerts for
# instances that fail to start or crash and for 5xx answered at the load balancer. Every alert goes to
# notification_channel_ids, which variables.tf requires outside development.

# The check runs from several regions every 5 minutes against https://<domain>. It asks for an object
# that never exists under /cache/results/ and expects the bucket's 404: that proves DNS, the managed
# certificate (validate_ssl), the forwarding rule, the URL map's /cache/ route, Cloud CDN and the load
# balancer's read access to results/ (without that grant the bucket answers 403). It deliberately
# avoids the API paths: a request there starts a GPU instance, and a check every few minutes from
# several regions would keep one running around the clock (~$1,300 a month, docs/cost.md) and defeat
# scale to zero. The service behind the API is watched by the alerts below and by every release's
# smoke test; the warmup job calls it every 10 minutes during business hours.
resource "google_monitoring_uptime_check_config" "public" {
  display_name = "${local.name} ${var.environment}: public URL"
  timeout      = "10s"
  period       = "300s"

  http_check {
    path           = local.uptime_check_path
    port           = 443
    use_ssl        = true
    validate_ssl   = true
    request_method = "GET"

    accepted_response_status_codes {
      status_value = 404
    }
  }

  monitored_resource {
    type = "uptime_url"
    labels = {
      project_id = var.project_id
      host       = var.domain
    }
  }

  depends_on = [google_project_service.enabled]
}

locals {
  # Result keys are hex digests with an extension; this name can never be one.
  uptime_check_path = "/cache/results/uptime-check-never-exists"
}

resource "google_monitoring_alert_policy" "uptime" {
  display_name          = "${local.name} ${var.environment}: public URL unreachable"
  combiner              = "OR"
  severity              = "CRITICAL"
  notification_channels = var.notification_channel_ids

  conditions {
    display_name = "uptime check failing from more than one region for 10 min"
    condition_threshold {
      filter          = "metric.type = \"monitoring.googleapis.com/uptime_check/check_passed\" AND resource.type = \"uptime_url\" AND metric.label.check_id = \"${google_monitoring_uptime_check_config.public.uptime_check_id}\""
      comparison      = "COMPARISON_GT"
      threshold_value = 1
      duration        = "600s"
      aggregations {
        alignment_period     = "1200s"
        per_series_aligner   = "ALIGN_NEXT_OLDER"
        cross_series_reducer = "REDUCE_COUNT_FALSE"
        group_by_fields      = ["resource.label.host"]
      }
      trigger {
        count = 1
      }
    }
  }

  alert_strategy {
    auto_close = "1800s"
  }

  documentation {
    content   = local.alert_documentation
    mime_type = "text/markdown"
  }

  depends_on = [google_project_service.enabled]
}

# Cloud Run writes startup probe failures ("STARTUP HTTP probe failed ... The instance was not
# started"), memory-limit kills and liveness failures to the revision's system log at severity ERROR,
# and a container's exit ("Container called exit(1)") there too. One of them is a revision that cannot serve: with scale
# to zero that is an outage at the next cold start, before any request has failed.
resource "google_monitoring_alert_policy" "instance_failures" {
  display_name          = "${local.name} ${var.environment}: instances failing to start or crashing"
  combiner              = "OR"
  severity              = "ERROR"
  notification_channels = var.notification_channel_ids

  conditions {
    display_name = "startup probe failure, container exit or crash in the system log"
    condition_matched_log {
      # A crash exits non-zero; exit(0) is a normal shutdown after SIGTERM and is not matched.
      filter = "resource.type = \"cloud_run_revision\" AND resource.labels.service_name = \"${local.name}\" AND log_id(\"run.googleapis.com/varlog/system\") AND (severity >= ERROR OR textPayload:\"Container called exit(1)\")"
      label_extractors = {
        revision = "EXTRACT(resource.labels.revision_name)"
      }
    }
  }

  alert_strategy {
    # Log-match conditions require a notification rate limit.
    notification_rate_limit {
      period = "300s"
    }
    auto_close = "1800s"
  }

  documentation {
    content   = local.alert_documentation
    mime_type = "text/markdown"
  }

  depends_on = [google_project_service.enabled]
}

# 5xx as the browser saw it: includes what Cloud Run's own request_count cannot see (no instance could
# be started, the serverless NEG failed, a request timed out at the load balancer). The /cache/ route's
# answers count too; a bucket 5xx is worth hearing about as well.
resource "google_monitoring_alert_policy" "lb_errors" {
  display_name          = "${local.name} ${var.environment}: load balancer 5xx ratio"
  combiner              = "OR"
  severity              = "ERROR"
  notification_channels = var.notification_channel_ids

  conditions {
    display_name = "more than ${var.alert_thresholds.error_ratio * 100}% of load balancer responses 5xx for 5 min"
    condition_threshold {
      filter             = "metric.type = \"loadbalancing.googleapis.com/https/request_count\" AND ${local.lb_filter} AND metric.label.response_code_class = 500"
      denominator_filter = "metric.type = \"loadbalancing.googleapis.com/https/request_count\" AND ${local.lb_filter}"
      comparison         = "COMPARISON_GT"
      threshold_value    = var.alert_thresholds.error_ratio
      duration           = "300s"
      aggregations {
        alignment_period     = "60s"
        per_series_aligner   = "ALIGN_RATE"
        cross_series_reducer = "REDUCE_SUM"
        group_by_fields      = ["resource.label.url_map_name"]
      }
      denominator_aggregations {
        alignment_period     = "60s"
        per_series_aligner   = "ALIGN_RATE"
        cross_series_reducer = "REDUCE_SUM"
        group_by_fields      = ["resource.label.url_map_name"]
      }
      trigger {
        count = 1
      }
    }
  }

  alert_strategy {
    auto_close = "1800s"
  }

  documentation {
    content   = local.alert_documentation
    mime_type = "text/markdown"
  }

  depends_on = [google_project_service.enabled]
}

locals {
  # The global external Application Load Balancer reports on the https_lb_rule resource, per URL map.
  lb_filter = "resource.type = \"https_lb_rule\" AND resource.label.url_map_name = \"${google_compute_url_map.https.name}\""
}
