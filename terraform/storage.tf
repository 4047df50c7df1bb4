# Results and cached masks: content-addressed, immutable objects written by the service
# (`results/<key>.<ext>`, `masks/<image_sha256>-<model>.png`) and read by browsers through the load
# balancer's /cache/* route with Cloud CDN in front. The bucket itself is private: Cloud CDN's private
# bucket access reads it as the load balancer's service agent, and nothing is granted to allUsers.
resource "google_storage_bucket" "results" {
  #checkov:skip=CKV_GCP_62:Reads are logged by the load balancer (log_config on the backends); write access is in Cloud Audit Logs. Bucket access logs would duplicate both for a cache.
  #checkov:skip=CKV_GCP_78:A content-addressed cache: an object is never rewritten with different bytes, and a lost object is re-rendered on the next request, so versions would only add cost.
  name                        = "${var.project_id}-${local.name}-results"
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = !var.deletion_protection
  labels                      = local.labels

  # Deleted cache entries need no undelete window.
  soft_delete_policy {
    retention_duration_seconds = 0
  }

  lifecycle_rule {
    condition {
      age            = var.result_retention_days
      matches_prefix = local.public_prefixes
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.enabled]
}

# The service reads results (objects.get), writes new ones first-writer-wins (if_generation_match=0)
# and, when a stored object fails its checksum, replaces exactly that generation, which is an
# overwrite and needs objects.delete: objectUser on this bucket only, no bucket or IAM administration.
resource "google_storage_bucket_iam_member" "runtime_uses_results" {
  bucket = google_storage_bucket.results.name
  role   = "roles/storage.objectUser"
  member = google_service_account.runtime.member
}

# Private bucket access for Cloud CDN: the load balancer fetches cache misses as its service agent.
# Google creates that agent with the project's first backend bucket, hence the depends_on (on a brand
# new project a second `terraform apply` may be needed if IAM has not seen the agent yet).
# The condition limits it to the two public prefixes and, since objects.list is checked against the
# bucket rather than an object, keeps the bucket unlistable through the CDN.
resource "google_storage_bucket_iam_member" "cdn_reads_public_prefixes" {
  bucket = google_storage_bucket.results.name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:service-${data.google_project.this.number}@https-lb.iam.gserviceaccount.com"

  condition {
    title       = "public-prefixes-only"
    description = "Only results/ and masks/ are served through the CDN path /cache/*."
    expression = join(" || ", [
      for prefix in local.public_prefixes :
      "resource.name.startsWith(\"projects/_/buckets/${google_storage_bucket.results.name}/objects/${prefix}\")"
    ])
  }

  depends_on = [google_compute_backend_bucket.results]
}
