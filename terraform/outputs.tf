output "public_url" {
  description = "Where the storefront calls the API and fetches results (/cache/...)."
  value       = local.pub_url
}

output "lb_ip_address" {
  description = "Point an A record for var.domain here; the managed certificate is issued once it resolves."
  value       = google_compute_global_address.lb.address
}

output "service_url" {
  description = "The Cloud Run service's own URL. With the default ingress it answers only internal callers (Cloud Scheduler's warmup); browsers use public_url."
  value       = google_cloud_run_v2_service.cutout.uri
}

output "canary_url" {
  description = "Where a release smoke-tests the revision tagged canary, through the load balancer and Cloud Armor."
  value       = "${local.pub_url}${trimsuffix(local.canary_path, "/")}"
}

output "service_name" {
  description = "Cloud Run service name (GitHub variable CLOUD_RUN_SERVICE)."
  value       = google_cloud_run_v2_service.cutout.name
}

output "region" {
  description = "Region of the service, repository and builds (GitHub variable GCP_REGION)."
  value       = var.region
}

output "results_bucket" {
  description = "Bucket holding results/ and masks/ (CUTOUT_GCS_BUCKET)."
  value       = google_storage_bucket.results.name
}

output "artifact_repository" {
  description = "Artifact Registry repository id (GitHub variable ARTIFACT_REPOSITORY)."
  value       = google_artifact_registry_repository.images.repository_id
}

output "image_base" {
  description = "Image path without tag; builds push <image_base>:<git tag> and :<commit>."
  value       = "${var.region}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.images.repository_id}/cutout"
}

output "build_sources_bucket" {
  description = "Bucket the deploy workflow uploads the source tarball to (GitHub variable BUILD_SOURCES_BUCKET)."
  value       = google_storage_bucket.build_sources.name
}

output "build_service_account" {
  description = "Service account Cloud Build runs as (GitHub variable BUILD_SERVICE_ACCOUNT)."
  value       = google_service_account.build.email
}

output "deploy_service_account" {
  description = "Service account GitHub Actions impersonates (GitHub variable GCP_DEPLOY_SERVICE_ACCOUNT)."
  value       = google_service_account.deployer.email
}

output "workload_identity_provider" {
  description = "Full provider name for google-github-actions/auth (GitHub variable GCP_WORKLOAD_IDENTITY_PROVIDER)."
  value       = google_iam_workload_identity_pool_provider.github.name
}

output "warmup_token_secret" {
  description = "Secret Manager secret holding the X-Warmup-Token value (gcloud secrets versions access latest --secret=...)."
  value       = google_secret_manager_secret.warmup_token.secret_id
}

output "github_variables" {
  description = "The GitHub environment variables deploy.yml reads, ready to paste (docs/deployment.md)."
  value = {
    GCP_PROJECT_ID                 = var.project_id
    GCP_REGION                     = var.region
    CLOUD_RUN_SERVICE              = google_cloud_run_v2_service.cutout.name
    ARTIFACT_REPOSITORY            = google_artifact_registry_repository.images.repository_id
    BUILD_SOURCES_BUCKET           = google_storage_bucket.build_sources.name
    BUILD_SERVICE_ACCOUNT          = google_service_account.build.email
    GCP_DEPLOY_SERVICE_ACCOUNT     = google_service_account.deployer.email
    GCP_WORKLOAD_IDENTITY_PROVIDER = google_iam_workload_identity_pool_provider.github.name
    PUBLIC_URL                     = local.pub_url
  }
}
