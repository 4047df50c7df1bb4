# Results and cached masks: content-addressed, immutable objects written by the service
# (`results/<key>.<ext>`, `masks/<image_sha256>-<model>.png`) and read by browsers through the load
# balancer's /cache/* route with Cloud CDN in front. The bucket itself is private: Cloud CDN's private
# bucket access reads it as the load balancer's service agent, and nothing is granted to allUsers.
#
# Beside the cache, an order's pictures (docs/storefront.md, "Keeping an order's pictures"):
#   uploads/<sha256>        processed photos, held upload_retention_days so an order can keep one by hash;
#                           private (only the service reads them)
#   kept/<sha256>.<ext>     an order's pictures, named by the sha256 of their bytes, each carrying its
#                           keep-until date as Custom-Time, which only ever moves later; deleted a day
#                           after that date, and in any case kept_max_age_days after being written (the
#                           service writes a new generation of the same bytes when a keep needs longer)
# Lifecycle conditions in one rule must all hold, and an object matching any Delete rule is deleted;
# `daysSinceCustomTime` does not apply to an object without a Custom-Time, so each kept/ object carries
# one from its first write (https://cloud.google.com/storage/docs/lifecycle#conditions).
locals {
  upload_prefix = "uploads/"
  kept_prefix   = "kept/"
  # What the CDN may read: the cache, and kept pictures (their links are what a cart or order holds).
  cdn_prefixes = concat(local.public_prefixes, [local.kept_prefix])
}

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

  # The cache: results and masks expire result_retention_days after they were written.
  lifecycle_rule {
    condition {
      age            = var.result_retention_days
      matches_prefix = local.public_prefixes
    }
    action {
      type = "Delete"
    }
  }

  # Processed photos, held briefly for POST /v1/keep with image_sha256.
  lifecycle_rule {
    condition {
      age            = var.upload_retention_days
      matches_prefix = [local.upload_prefix]
    }
    action {
      type = "Delete"
    }
  }

  # Kept pictures: deleted once a whole day has passed since their keep-until date (Custom-Time).
  # 1 rather than 0: kept_until is a promise, and the provider omits a 0 unless told to send it.
  lifecycle_rule {
    condition {
      days_since_custom_time = 1
      matches_prefix         = [local.kept_prefix]
    }
    action {
      type = "Delete"
    }
  }

  # Backstop for kept pictures: nothing under kept/ outlives kept_max_age_days from its last write.
  lifecycle_rule {
    condition {
      age            = var.kept_max_age_days
      matches_prefix = [local.kept_prefix]
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.enabled]
}

# The service reads results (objects.get), writes new ones first-writer-wins (if_generation_match=0)
# and, when a stored object fails its checksum, replaces exactly that generation, which is an
# overwrite and needs objects.delete; it lengthens a kept picture's Custom-Time (objects.update):
# objectUser on this bucket only, no bucket or IAM administration.
resource "google_storage_bucket_iam_member" "runtime_uses_results" {
  bucket = google_storage_bucket.results.name
  role   = "roles/storage.objectUser"
  member = google_service_account.runtime.member
}

# Private bucket access for Cloud CDN: the load balancer fetches cache misses as its service agent.
# Google creates that agent with the project's first backend bucket, hence the depends_on (on a brand
# new project a second `terraform apply` may be needed if IAM has not seen the agent yet).
# The condition limits it to the cache's prefixes and kept/ (never uploads/) and, since objects.list is
# checked against the bucket rather than an object, keeps the bucket unlistable through the CDN.
resource "google_storage_bucket_iam_member" "cdn_reads_public_prefixes" {
  bucket = google_storage_bucket.results.name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:service-${data.google_project.this.number}@https-lb.iam.gserviceaccount.com"

  condition {
    title       = "public-prefixes-only"
    description = "Only results/, masks/ and kept/ are served through the CDN path /cache/*."
    expression = join(" || ", [
      for prefix in local.cdn_prefixes :
      "resource.name.startsWith(\"projects/_/buckets/${google_storage_bucket.results.name}/objects/${prefix}\")"
    ])
  }

  depends_on = [google_compute_backend_bucket.results]
}
