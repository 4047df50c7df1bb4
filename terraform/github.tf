# GitHub Actions authenticates with its OIDC token, exchanged through this pool for short-lived
# credentials of the deployer service account: no service account key exists anywhere.
resource "google_iam_workload_identity_pool" "github" {
  workload_identity_pool_id = "github"
  display_name              = "GitHub Actions"
  description               = "OIDC tokens of GitHub Actions runs of ${var.github_repository}"

  depends_on = [google_project_service.enabled]
}

resource "google_iam_workload_identity_pool_provider" "github" {
  #checkov:skip=CKV_GCP_125:False positive: checkov does not substitute variables inside the CEL string, so it cannot see that assertion.sub is pinned to repo:<owner/repo>:environment:<environment>; tests/iac/test_terraform.py asserts the condition instead.
  workload_identity_pool_id          = google_iam_workload_identity_pool.github.workload_identity_pool_id
  workload_identity_pool_provider_id = "github-actions"
  display_name                       = "GitHub Actions OIDC"

  attribute_mapping = {
    "google.subject"       = "assertion.sub"
    "attribute.repository" = "assertion.repository"
    "attribute.ref"        = "assertion.ref"
    "attribute.actor"      = "assertion.actor"
  }

  # Tokens are accepted only from this repository's jobs bound to the GitHub environment named like
  # this one (deploy.yml sets `environment:`; give that environment protection rules such as a
  # tags-only deployment policy and required reviewers). Everything else is refused at the exchange,
  # before any IAM binding is looked at.
  attribute_condition = "assertion.repository == '${var.github_repository}' && assertion.sub == 'repo:${var.github_repository}:environment:${var.environment}'"

  oidc {
    issuer_uri = "https://token.actions.githubusercontent.com"
  }
}

# Only workflows of this repository may impersonate the deployer.
resource "google_service_account_iam_member" "github_deploys" {
  service_account_id = google_service_account.deployer.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "principalSet://iam.googleapis.com/${google_iam_workload_identity_pool.github.name}/attribute.repository/${var.github_repository}"
}
