# The shared secret accepted by POST /warmup in the X-Warmup-Token header (Cloud Scheduler itself uses
# an OIDC token instead; the header is for operators and scripts). Terraform generates it, so it sits in
# the state bucket too: keep that bucket private.
#
# Rotation (docs/deployment.md, "Rotating the warmup token"):
#   terraform apply -replace=random_password.warmup_token
# creates the new version first, then disables the old one. The service reads "latest" when an
# instance starts (cloud_run.tf), so no revision pins a version: new instances take the new token,
# instances already running keep the one they started with until they stop, and a rollback to an
# older revision starts with the new token too. Nothing creates a revision, and nothing serving ever
# points at a disabled version.
resource "google_secret_manager_secret" "warmup_token" {
  secret_id = "${local.name}-warmup-token"
  labels    = local.labels

  replication {
    auto {}
  }

  depends_on = [google_project_service.enabled]
}

resource "random_password" "warmup_token" {
  length  = 48
  special = false
}

resource "google_secret_manager_secret_version" "warmup_token" {
  secret      = google_secret_manager_secret.warmup_token.id
  secret_data = random_password.warmup_token.result

  # A replaced version is disabled, not destroyed: an operator can re-enable it
  # (gcloud secrets versions enable) if the new one turns out wrong, then destroy it by hand.
  deletion_policy = "DISABLE"

  lifecycle {
    # secret_data forces a new version; create it before the old one goes, so "latest" always
    # resolves to an enabled version while instances start.
    create_before_destroy = true
  }
}

resource "google_secret_manager_secret_iam_member" "runtime_reads_warmup_token" {
  secret_id = google_secret_manager_secret.warmup_token.id
  role      = "roles/secretmanager.secretAccessor"
  member    = google_service_account.runtime.member
}
