# The shared secret accepted by POST /warmup in the X-Warmup-Token header (Cloud Scheduler itself uses
# an OIDC token instead; the header is for operators and scripts). Terraform generates it, so it sits in
# the state bucket too: keep that bucket private. Rotate with
#   terraform apply -replace=random_password.warmup_token
# which also rolls a new revision (the revision pins the secret version).
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
}

resource "google_secret_manager_secret_iam_member" "runtime_reads_warmup_token" {
  secret_id = google_secret_manager_secret.warmup_token.id
  role      = "roles/secretmanager.secretAccessor"
  member    = google_service_account.runtime.member
}
