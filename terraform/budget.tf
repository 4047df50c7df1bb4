# A monthly budget on this project: alerts at each threshold of actual spend and when the month's
# forecast passes the budget. Budgets alert; they do not stop spending (max_instances is the hard cap).
resource "google_billing_budget" "project" {
  billing_account = var.billing_account_id
  display_name    = "${local.name}-${var.environment}"

  budget_filter {
    projects = ["projects/${data.google_project.this.number}"]
  }

  amount {
    specified_amount {
      currency_code = "USD"
      units         = tostring(var.monthly_budget_usd)
    }
  }

  dynamic "threshold_rules" {
    for_each = var.budget_alert_thresholds
    content {
      threshold_percent = threshold_rules.value
      spend_basis       = "CURRENT_SPEND"
    }
  }

  threshold_rules {
    threshold_percent = 1.0
    spend_basis       = "FORECASTED_SPEND"
  }

  all_updates_rule {
    monitoring_notification_channels = var.notification_channel_ids
    # Billing admins of the account are e-mailed as well.
    disable_default_iam_recipients = false
  }

  depends_on = [google_project_service.enabled]
}
