terraform {
  # 1.9+: variable validations that refer to other variables (cpu with memory_gib, the channels with
  # environment, the derived names with project_id, gpu_quota with max_instances).
  required_version = ">= 1.9.0"

  required_providers {
    google = {
      source = "hashicorp/google"
      # 6.40+ has everything used here for GPUs on Cloud Run (node_selector, gpu_zonal_redundancy_disabled,
      # invoker_iam_disabled). Commit .terraform.lock.hcl after the first `terraform init` to pin the exact build.
      version = ">= 6.40.0, < 8.0.0"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.6"
    }
  }

  # State lives in a GCS bucket made once per project (docs/deployment.md, step 2):
  #   terraform init -backend-config="bucket=<project>-tfstate" -backend-config="prefix=cutout/<environment>"
  backend "gcs" {}
}

provider "google" {
  project = var.project_id
  region  = var.region

  # The Budgets API refuses user credentials without a quota project; bill API calls to this project.
  billing_project       = var.project_id
  user_project_override = true
}
