# Images: <region>-docker.pkg.dev/<project>/<service_name>/cutout:<git tag> (and :<commit>), plus the
# BuildKit layer cache (:buildcache) that lets a build reuse the weights layers of the previous one.
resource "google_artifact_registry_repository" "images" {
  #checkov:skip=CKV_GCP_84:Images hold public code and public model weights; Google-managed encryption is enough and a CMEK key would add a KMS dependency to every pull on cold start.
  location      = var.region
  repository_id = local.name
  format        = "DOCKER"
  description   = "Cutout service images"
  labels        = local.labels

  docker_config {
    # Mutable: :buildcache moves with every build, and re-running a release re-pushes its tag.
    immutable_tags = false
  }

  cleanup_policy_dry_run = false

  cleanup_policies {
    id     = "keep-recent-releases"
    action = "KEEP"
    most_recent_versions {
      keep_count = 10
    }
  }

  cleanup_policies {
    id     = "keep-build-cache"
    action = "KEEP"
    condition {
      tag_state    = "TAGGED"
      tag_prefixes = ["buildcache"]
    }
  }

  cleanup_policies {
    id     = "delete-old"
    action = "DELETE"
    condition {
      tag_state  = "ANY"
      older_than = "2592000s"
    }
  }

  depends_on = [google_project_service.enabled]
}

resource "google_artifact_registry_repository_iam_member" "build_pushes" {
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.writer"
  member     = google_service_account.build.member
}

# scripts/deploy.py resolves the tag it deploys to a digest, so a revision names the exact image.
resource "google_artifact_registry_repository_iam_member" "deployer_reads" {
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.reader"
  member     = google_service_account.deployer.member
}

# Cloud Build's source staging for releases. `gcloud builds submit` always copies the source into a
# staging directory before the build starts, a gs:// source included (it rewrites the object there),
# and without --gcs-source-staging-dir that directory is gs://<project>_cloudbuild/source, a bucket
# gcloud creates when it is missing: the deployer can create no buckets and the build account could
# not read it. deploy.yml therefore passes --gcs-source-staging-dir gs://<this bucket>/source: gcloud
# checks the bucket exists (storage.buckets.get, legacyBucketReader), uploads the `git archive`
# tarball into it (objectCreator), and the build account reads it from there (objectViewer).
resource "google_storage_bucket" "build_sources" {
  #checkov:skip=CKV_GCP_62:Holds only source tarballs of public commits for a week; Cloud Audit Logs already record who wrote them.
  #checkov:skip=CKV_GCP_78:Every object is a tarball named by its commit and rewritten identically; versions would only keep duplicates.
  name                        = "${var.project_id}-${local.name}-build"
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = true
  labels                      = local.labels

  lifecycle_rule {
    condition {
      age = 7
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.enabled]
}

locals {
  build_source_grants = {
    deployer_writes  = { member = google_service_account.deployer.member, role = "roles/storage.objectCreator" }
    deployer_reads   = { member = google_service_account.deployer.member, role = "roles/storage.objectViewer" }
    deployer_bucket  = { member = google_service_account.deployer.member, role = "roles/storage.legacyBucketReader" }
    build_reads      = { member = google_service_account.build.member, role = "roles/storage.objectViewer" }
    build_bucket_get = { member = google_service_account.build.member, role = "roles/storage.legacyBucketReader" }
  }
}

resource "google_storage_bucket_iam_member" "build_sources" {
  for_each = local.build_source_grants

  bucket = google_storage_bucket.build_sources.name
  role   = each.value.role
  member = each.value.member
}
