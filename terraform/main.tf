# Cutout on GCP: one Cloud Run service with an L4 GPU behind a global external Application Load
# Balancer, results in a private bucket served through Cloud CDN. The resources are split by concern:
#   apis.tf           the APIs this needs
#   iam.tf            service accounts and their roles (least privilege)
#   registry.tf       Artifact Registry for the images, the Cloud Build staging bucket
#   storage.tf        the results bucket
#   secrets.tf        the warmup token
#   cloud_run.tf      the service
#   load_balancer.tf  address, certificate, serverless NEG, CDN backend bucket, URL map, proxies
#   armor.tf          Cloud Armor policy
#   scheduler.tf      the business-hours warmup job
#   monitoring.tf     alert policies on the service, the cache metric, the dashboard
#   health.tf         uptime check on the public URL; startup/crash, load balancer 5xx and uptime alerts
#   budget.tf         the billing budget
#   github.tf         Workload Identity Federation for GitHub Actions

data "google_project" "this" {
  project_id = var.project_id
}

locals {
  name    = var.service_name
  labels  = { app = "cutout", environment = var.environment, managed-by = "terraform" }
  pub_url = "https://${var.domain}"

  # Cloud Scheduler signs its OIDC token for this audience; the service accepts tokens for it only.
  warmup_audience = "${local.pub_url}/warmup"

  # The only places the load balancer's service agent may read: what the service writes for clients.
  public_prefixes = ["results/", "masks/"]

  # Releases smoke-test the revision tagged canary_tag at <public URL>/canary/ (scripts/deploy.py
  # CANARY_TAG and CANARY_PATH hold the same values).
  canary_tag  = "canary"
  canary_path = "/canary/"
}
