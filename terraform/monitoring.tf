# Alerts on what a storefront customer or the bill would notice, and one dashboard.
# Cloud Run's built-in metrics are filtered to this service. The service's own metrics
# (service/metrics.py) are custom.googleapis.com/cutout/<name> on the generic_task resource: counters
# are CUMULATIVE INT64, latencies and per-image figures CUMULATIVE distributions, the rest gauges.

# Cloud Monitoring rejects (400) an alert filter that does not restrict resource.type, ratio filters
# included (terraform-provider-google #4165, #7179); tests/iac/test_terraform.py checks every filter
# here, the dashboard's too.
locals {
  run_filter = "resource.type = \"cloud_run_revision\" AND resource.label.service_name = \"${local.name}\""
  # The service writes its own metrics on the generic_task resource (service/metrics.py).
  custom_filter = "resource.type = \"generic_task\""

  alert_documentation = "Cutout ${var.environment}: see docs/deployment.md (Operating) for what each alert means and what to check first."
}

# The alert below needs the metric type to exist before the service has written a point, so it is
# declared here. The service writes it as a cumulative count per outcome (hit, miss, bypass).
resource "google_monitoring_metric_descriptor" "cache_requests" {
  type         = "custom.googleapis.com/cutout/cache_requests"
  display_name = "Cutout result cache requests"
  description  = "Result cache lookups of the Cutout service, by outcome."
  metric_kind  = "CUMULATIVE"
  value_type   = "INT64"
  unit         = "1"

  labels {
    key         = "outcome"
    value_type  = "STRING"
    description = "hit, miss or bypass (the store failed and the request was served uncached)"
  }

  depends_on = [google_project_service.enabled]
}

resource "google_monitoring_alert_policy" "latency_p95" {
  display_name          = "${local.name} ${var.environment}: p95 request latency"
  combiner              = "OR"
  severity              = "WARNING"
  notification_channels = var.notification_channel_ids

  conditions {
    display_name = "p95 latency above ${var.alert_thresholds.p95_latency_ms} ms for 10 min"
    condition_threshold {
      filter          = "metric.type = \"run.googleapis.com/request_latencies\" AND ${local.run_filter}"
      comparison      = "COMPARISON_GT"
      threshold_value = var.alert_thresholds.p95_latency_ms
      duration        = "600s"
      aggregations {
        alignment_period     = "300s"
        per_series_aligner   = "ALIGN_DELTA"
        cross_series_reducer = "REDUCE_PERCENTILE_95"
        group_by_fields      = ["resource.label.service_name"]
      }
      trigger {
        count = 1
      }
    }
  }

  alert_strategy {
    auto_close = "3600s"
  }

  documentation {
    content   = local.alert_documentation
    mime_type = "text/markdown"
  }

  depends_on = [google_project_service.enabled]
}

resource "google_monitoring_alert_policy" "error_ratio" {
  display_name          = "${local.name} ${var.environment}: 5xx ratio"
  combiner              = "OR"
  severity              = "ERROR"
  notification_channels = var.notification_channel_ids

  conditions {
    display_name = "more than ${var.alert_thresholds.error_ratio * 100}% of requests answered 5xx for 5 min"
    condition_threshold {
      filter             = "metric.type = \"run.googleapis.com/request_count\" AND metric.label.response_code_class = \"5xx\" AND ${local.run_filter}"
      denominator_filter = "metric.type = \"run.googleapis.com/request_count\" AND ${local.run_filter}"
      comparison         = "COMPARISON_GT"
      threshold_value    = var.alert_thresholds.error_ratio
      duration           = "300s"
      aggregations {
        alignment_period     = "60s"
        per_series_aligner   = "ALIGN_RATE"
        cross_series_reducer = "REDUCE_SUM"
        group_by_fields      = ["resource.label.service_name"]
      }
      denominator_aggregations {
        alignment_period     = "60s"
        per_series_aligner   = "ALIGN_RATE"
        cross_series_reducer = "REDUCE_SUM"
        group_by_fields      = ["resource.label.service_name"]
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

# Every instance is an L4 billed by the second: more of them for long is the cost alarm.
resource "google_monitoring_alert_policy" "instance_count" {
  display_name          = "${local.name} ${var.environment}: instance count (cost)"
  combiner              = "OR"
  severity              = "WARNING"
  notification_channels = var.notification_channel_ids

  conditions {
    display_name = "more than ${var.alert_thresholds.instance_count} GPU instances for 30 min"
    condition_threshold {
      filter          = "metric.type = \"run.googleapis.com/container/instance_count\" AND ${local.run_filter}"
      comparison      = "COMPARISON_GT"
      threshold_value = var.alert_thresholds.instance_count
      duration        = "1800s"
      aggregations {
        alignment_period     = "60s"
        per_series_aligner   = "ALIGN_MAX"
        cross_series_reducer = "REDUCE_SUM"
        group_by_fields      = ["resource.label.service_name"]
      }
      trigger {
        count = 1
      }
    }
  }

  alert_strategy {
    auto_close = "3600s"
  }

  documentation {
    content   = local.alert_documentation
    mime_type = "text/markdown"
  }

  depends_on = [google_project_service.enabled]
}

resource "google_monitoring_alert_policy" "startup_latency" {
  display_name          = "${local.name} ${var.environment}: cold start latency"
  combiner              = "OR"
  severity              = "WARNING"
  notification_channels = var.notification_channel_ids

  conditions {
    display_name = "p95 container startup above ${var.alert_thresholds.p95_startup_latency_ms} ms"
    condition_threshold {
      filter          = "metric.type = \"run.googleapis.com/container/startup_latencies\" AND ${local.run_filter}"
      comparison      = "COMPARISON_GT"
      threshold_value = var.alert_thresholds.p95_startup_latency_ms
      duration        = "0s"
      aggregations {
        alignment_period     = "900s"
        per_series_aligner   = "ALIGN_DELTA"
        cross_series_reducer = "REDUCE_PERCENTILE_95"
        group_by_fields      = ["resource.label.service_name"]
      }
      trigger {
        count = 1
      }
    }
  }

  alert_strategy {
    auto_close = "3600s"
  }

  documentation {
    content   = local.alert_documentation
    mime_type = "text/markdown"
  }

  depends_on = [google_project_service.enabled]
}

resource "google_monitoring_alert_policy" "cache_hit_ratio" {
  display_name          = "${local.name} ${var.environment}: cache hit ratio"
  combiner              = "OR"
  severity              = "WARNING"
  notification_channels = var.notification_channel_ids

  conditions {
    display_name = "cache hits below ${var.alert_thresholds.min_cache_hit_ratio * 100}% of lookups for 1 h"
    condition_threshold {
      filter             = "metric.type = \"${google_monitoring_metric_descriptor.cache_requests.type}\" AND ${local.custom_filter} AND metric.label.outcome = \"hit\""
      denominator_filter = "metric.type = \"${google_monitoring_metric_descriptor.cache_requests.type}\" AND ${local.custom_filter} AND metric.label.outcome = one_of(\"hit\", \"miss\")"
      comparison         = "COMPARISON_LT"
      threshold_value    = var.alert_thresholds.min_cache_hit_ratio
      duration           = "3600s"
      aggregations {
        alignment_period     = "600s"
        per_series_aligner   = "ALIGN_RATE"
        cross_series_reducer = "REDUCE_SUM"
      }
      denominator_aggregations {
        alignment_period     = "600s"
        per_series_aligner   = "ALIGN_RATE"
        cross_series_reducer = "REDUCE_SUM"
      }
      trigger {
        count = 1
      }
    }
  }

  alert_strategy {
    auto_close = "7200s"
  }

  documentation {
    content   = local.alert_documentation
    mime_type = "text/markdown"
  }

  depends_on = [google_project_service.enabled]
}

resource "google_monitoring_dashboard" "cutout" {
  dashboard_json = jsonencode({
    displayName = "Cutout ${var.environment}"
    mosaicLayout = {
      columns = 12
      tiles = [
        for index, chart in local.dashboard_charts : {
          xPos   = (index % 2) * 6
          yPos   = floor(index / 2) * 4
          width  = 6
          height = 4
          widget = {
            title = chart.title
            xyChart = {
              chartOptions = { mode = "COLOR" }
              dataSets = [for series in chart.series : {
                plotType        = "LINE"
                legendTemplate  = series.legend
                targetAxis      = "Y1"
                timeSeriesQuery = { timeSeriesFilter = series.query }
              }]
            }
          }
        }
      ]
    }
  })

  depends_on = [google_project_service.enabled]
}

locals {
  dashboard_charts = [
    {
      title = "Request latency (ms)"
      series = [for percentile in ["50", "95", "99"] : {
        legend = "p${percentile}"
        query = {
          filter = "metric.type = \"run.googleapis.com/request_latencies\" AND ${local.run_filter}"
          aggregation = {
            alignmentPeriod    = "60s"
            perSeriesAligner   = "ALIGN_DELTA"
            crossSeriesReducer = "REDUCE_PERCENTILE_${percentile}"
          }
        }
      }]
    },
    {
      title = "Requests per second by status class"
      series = [{
        legend = "$${metric.labels.response_code_class}"
        query = {
          filter = "metric.type = \"run.googleapis.com/request_count\" AND ${local.run_filter}"
          aggregation = {
            alignmentPeriod    = "60s"
            perSeriesAligner   = "ALIGN_RATE"
            crossSeriesReducer = "REDUCE_SUM"
            groupByFields      = ["metric.label.response_code_class"]
          }
        }
      }]
    },
    {
      title = "Instances (each holds one L4)"
      series = [{
        legend = "$${metric.labels.state}"
        query = {
          filter = "metric.type = \"run.googleapis.com/container/instance_count\" AND ${local.run_filter}"
          aggregation = {
            alignmentPeriod    = "60s"
            perSeriesAligner   = "ALIGN_MAX"
            crossSeriesReducer = "REDUCE_SUM"
            groupByFields      = ["metric.label.state"]
          }
        }
      }]
    },
    {
      title = "Container startup latency p95 (ms)"
      series = [{
        legend = "startup p95"
        query = {
          filter = "metric.type = \"run.googleapis.com/container/startup_latencies\" AND ${local.run_filter}"
          aggregation = {
            alignmentPeriod    = "300s"
            perSeriesAligner   = "ALIGN_DELTA"
            crossSeriesReducer = "REDUCE_PERCENTILE_95"
          }
        }
      }]
    },
    {
      title = "Result cache lookups per second by outcome"
      series = [{
        legend = "$${metric.labels.outcome}"
        query = {
          filter = "metric.type = \"custom.googleapis.com/cutout/cache_requests\" AND ${local.custom_filter}"
          aggregation = {
            alignmentPeriod    = "300s"
            perSeriesAligner   = "ALIGN_RATE"
            crossSeriesReducer = "REDUCE_SUM"
            groupByFields      = ["metric.label.outcome"]
          }
        }
      }]
    },
    {
      title = "Requests refused by the service's limiter (429 per second)"
      series = [{
        legend = "$${metric.labels.family}"
        query = {
          filter = "metric.type = \"custom.googleapis.com/cutout/rate_limited\" AND ${local.custom_filter}"
          aggregation = {
            alignmentPeriod    = "300s"
            perSeriesAligner   = "ALIGN_RATE"
            crossSeriesReducer = "REDUCE_SUM"
            groupByFields      = ["metric.label.family"]
          }
        }
      }]
    },
    {
      title = "Stage latency p95 (ms)"
      series = [{
        legend = "$${metric.labels.stage}"
        query = {
          filter = "metric.type = \"custom.googleapis.com/cutout/stage_latency_ms\" AND ${local.custom_filter}"
          aggregation = {
            alignmentPeriod    = "300s"
            perSeriesAligner   = "ALIGN_DELTA"
            crossSeriesReducer = "REDUCE_PERCENTILE_95"
            groupByFields      = ["metric.label.stage"]
          }
        }
      }]
    },
    {
      title = "GPU memory in use (bytes)"
      series = [{
        legend = "max over instances"
        query = {
          filter = "metric.type = \"custom.googleapis.com/cutout/gpu_memory_bytes\" AND ${local.custom_filter}"
          aggregation = {
            alignmentPeriod    = "60s"
            perSeriesAligner   = "ALIGN_MAX"
            crossSeriesReducer = "REDUCE_MAX"
          }
        }
      }]
    },
    {
      title = "Cold start (s, as the service measures it)"
      series = [{
        legend = "cold start"
        query = {
          filter = "metric.type = \"custom.googleapis.com/cutout/cold_start_seconds\" AND ${local.custom_filter}"
          aggregation = {
            alignmentPeriod    = "300s"
            perSeriesAligner   = "ALIGN_MAX"
            crossSeriesReducer = "REDUCE_MAX"
          }
        }
      }]
    },
    {
      title = "GPU-seconds per image (median)"
      series = [{
        legend = "p50"
        query = {
          filter = "metric.type = \"custom.googleapis.com/cutout/gpu_seconds_per_image\" AND ${local.custom_filter}"
          aggregation = {
            alignmentPeriod    = "300s"
            perSeriesAligner   = "ALIGN_DELTA"
            crossSeriesReducer = "REDUCE_PERCENTILE_50"
          }
        }
      }]
    },
    {
      title = "Cost per image (USD, median)"
      series = [{
        legend = "p50"
        query = {
          filter = "metric.type = \"custom.googleapis.com/cutout/cost_per_image_usd\" AND ${local.custom_filter}"
          aggregation = {
            alignmentPeriod    = "300s"
            perSeriesAligner   = "ALIGN_DELTA"
            crossSeriesReducer = "REDUCE_PERCENTILE_50"
          }
        }
      }]
    },
  ]
}
