# Four identities, each with only what its job needs. Bucket-, secret- and repository-level grants sit
# next to those resources (storage.tf, secrets.tf, registry.tf); project-level grants are here.

# The service itself: writes results and masks, reads its warmup token, writes metrics and traces.
resource "google_service_account" "runtime" {
  account_id   = "${local.name}-run"
  display_name = "Cutout service (Cloud Run runtime)"

  depends_on = [google_project_service.enabled]
}

# Cloud Scheduler signs the warmup call's OIDC token as this account. It holds no roles: the service
# verifies the token (audience + this account's email) itself.
resource "google_service_account" "warmup" {
  account_id   = "${local.name}-warmup"
  display_name = "Cutout warmup caller (Cloud Scheduler)"

  depends_on = [google_project_service.enabled]
}

# Cloud Build runs the image build as this account: it pushes to the repository and writes build logs.
resource "google_service_account" "build" {
  account_id   = "${local.name}-build"
  display_name = "Cutout image build (Cloud Build)"

  depends_on = [google_project_service.enabled]
}

# GitHub Actions impersonates this account through Workload Identity Federation (github.tf) to build,
# deploy a tagged revision, check it and shift traffic.
resource "google_service_account" "deployer" {
  account_id   = "${local.name}-deploy"
  display_name = "Cutout deployer (GitHub Actions)"

  depends_on = [google_project_service.enabled]
}

locals {
  project_roles = {
    runtime_metrics = { member = google_service_account.runtime.member, role = "roles/monitoring.metricWriter" }
    runtime_traces  = { member = google_service_account.runtime.member, role = "roles/cloudtrace.agent" }
    build_logs      = { member = google_service_account.build.member, role = "roles/logging.logWriter" }
    # Follow builds: gcloud builds submit streams the build's log from Cloud Logging.
    deployer_logs = { member = google_service_account.deployer.member, role = "roles/logging.viewer" }
    # Deploy revisions and move traffic. Revisions are listed at the location level, so this cannot be
    # narrowed to the one service; the project holds nothing but this environment.
    deployer_run = { member = google_service_account.deployer.member, role = "roles/run.developer" }
    # Read the new revision's request counts between traffic steps (scripts/deploy.py check).
    deployer_metrics = { member = google_service_account.deployer.member, role = "roles/monitoring.viewer" }
    # gcloud bills its API calls to the project.
    deployer_usage = { member = google_service_account.deployer.member, role = "roles/serviceusage.serviceUsageConsumer" }
  }
}

# Submit the image build. Kept apart from the map above because it is the one grant that lets a build
# run as another service account: a build may only run as an account the caller can actAs, and the
# deployer can actAs the build account and the runtime account only (below).
resource "google_project_iam_member" "deployer_submits_builds" {
  #checkov:skip=CKV_GCP_49:Submitting builds is the deployer's job; which account a build runs as is limited by actAs, granted on the build account only (and the runtime account for deploys).
  project = var.project_id
  role    = "roles/cloudbuild.builds.editor"
  member  = google_service_account.deployer.member
}

resource "google_project_iam_member" "roles" {
  for_each = local.project_roles

  project = var.project_id
  role    = each.value.role
  member  = each.value.member
}

# Deploying a revision that runs as the runtime account, and a build that runs as the build account,
# both need actAs on that account.
resource "google_service_account_iam_member" "deployer_acts_as_runtime" {
  service_account_id = google_service_account.runtime.name
  role               = "roles/iam.serviceAccountUser"
  member             = google_service_account.deployer.member
}

resource "google_service_account_iam_member" "deployer_acts_as_build" {
  service_account_id = google_service_account.build.name
  role               = "roles/iam.serviceAccountUser"
  member             = google_service_account.deployer.member
}
