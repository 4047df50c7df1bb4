# Global external Application Load Balancer (EXTERNAL_MANAGED) on https://<domain>:
#   /cache/*  -> backend bucket (Cloud CDN) -> results bucket, with the /cache prefix stripped, so
#                /cache/results/<key>.png reads the object results/<key>.png
#   /canary/* -> backend service (Cloud Armor) -> serverless NEG -> the revision tagged "canary", with
#                the /canary prefix stripped: how a release smoke-tests a revision before it gets
#                traffic, through the same load balancer, Cloud Armor and X-Forwarded-For as customers
#   /*        -> backend service (Cloud Armor) -> serverless NEG -> the Cloud Run service
# Port 80 only redirects to HTTPS.

resource "google_compute_global_address" "lb" {
  name       = "${local.name}-lb"
  ip_version = "IPV4"

  depends_on = [google_project_service.enabled]
}

resource "google_compute_managed_ssl_certificate" "lb" {
  name = "${local.name}-cert"

  managed {
    domains = [var.domain]
  }

  lifecycle {
    create_before_destroy = true
  }

  depends_on = [google_project_service.enabled]
}

resource "google_dns_record_set" "lb" {
  count = var.dns_managed_zone == "" ? 0 : 1

  managed_zone = var.dns_managed_zone
  name         = "${var.domain}."
  type         = "A"
  ttl          = 300
  rrdatas      = [google_compute_global_address.lb.address]
}

# ---------------------------------------------------------------- the API: Cloud Run

resource "google_compute_region_network_endpoint_group" "cutout" {
  name                  = "${local.name}-neg"
  region                = var.region
  network_endpoint_type = "SERVERLESS"

  cloud_run {
    service = google_cloud_run_v2_service.cutout.name
  }
}

resource "google_compute_backend_service" "api" {
  name                  = "${local.name}-api"
  description           = "Cutout API on Cloud Run"
  load_balancing_scheme = "EXTERNAL_MANAGED"
  protocol              = "HTTPS"
  security_policy       = google_compute_security_policy.api.id
  # Responses are per upload; the CDN is for results, on the bucket backend.
  enable_cdn = false

  backend {
    group = google_compute_region_network_endpoint_group.cutout.id
  }

  log_config {
    enable      = true
    sample_rate = 1.0
  }
}

# The revision carrying the "canary" tag. scripts/deploy.py puts that tag on each new revision before it
# gets traffic and leaves it on the revision that serves afterwards (or moves it back on rollback), so
# /canary/ always reaches a revision once the first release is out. It is public like the API and
# passes the same Cloud Armor policy; what it serves is either the serving revision or, for the minutes
# of a release, the one about to serve.
resource "google_compute_region_network_endpoint_group" "canary" {
  name                  = "${local.name}-canary-neg"
  region                = var.region
  network_endpoint_type = "SERVERLESS"

  cloud_run {
    service = google_cloud_run_v2_service.cutout.name
    tag     = local.canary_tag
  }
}

resource "google_compute_backend_service" "canary" {
  name                  = "${local.name}-canary"
  description           = "Cutout API, the revision tagged ${local.canary_tag} (release smoke tests)"
  load_balancing_scheme = "EXTERNAL_MANAGED"
  protocol              = "HTTPS"
  security_policy       = google_compute_security_policy.api.id
  enable_cdn            = false

  backend {
    group = google_compute_region_network_endpoint_group.canary.id
  }

  log_config {
    enable      = true
    sample_rate = 1.0
  }
}

# ---------------------------------------------------------------- the results: bucket + Cloud CDN

resource "google_compute_backend_bucket" "results" {
  name        = "${local.name}-results"
  description = "Cutout results and masks through Cloud CDN"
  bucket_name = google_storage_bucket.results.name
  enable_cdn  = true
  # PNG and WebP are compressed already.
  compression_mode = "DISABLED"

  # Results are fetched from the storefront's pages (fetch/canvas as well as <img>); the objects are
  # public through this path anyway, so any origin may read them.
  custom_response_headers = [
    "Access-Control-Allow-Origin: *",
    "X-Cache-Status: {cdn_cache_status}",
  ]

  cdn_policy {
    # A private bucket answers with `Cache-Control: private`; results are content-addressed and
    # immutable, so cache every successful response regardless.
    cache_mode        = "FORCE_CACHE_ALL"
    default_ttl       = var.cdn_ttl_s
    client_ttl        = var.cdn_ttl_s
    serve_while_stale = 86400

    # A result is requested only after the service wrote it; keep a miss briefly so a mistyped key
    # cannot hammer the bucket.
    negative_caching = true
    negative_caching_policy {
      code = 404
      ttl  = 60
    }
    request_coalescing = true
  }
}

# ---------------------------------------------------------------- routing

resource "google_compute_url_map" "https" {
  name            = "${local.name}-https"
  description     = "Cutout: /cache/* from the CDN bucket, everything else from Cloud Run"
  default_service = google_compute_backend_service.api.id

  host_rule {
    hosts        = [var.domain]
    path_matcher = "cutout"
  }

  path_matcher {
    name            = "cutout"
    default_service = google_compute_backend_service.api.id

    # Objects are named results/... and masks/...: strip /cache before the bucket sees the path.
    route_rules {
      priority = 1
      service  = google_compute_backend_bucket.results.id
      match_rules {
        prefix_match = "/cache/"
      }
      route_action {
        url_rewrite {
          path_prefix_rewrite = "/"
        }
      }
    }

    # /canary/ready reaches the canary revision's /ready, and so on.
    route_rules {
      priority = 2
      service  = google_compute_backend_service.canary.id
      match_rules {
        prefix_match = local.canary_path
      }
      route_action {
        url_rewrite {
          path_prefix_rewrite = "/"
        }
      }
    }
  }
}

resource "google_compute_ssl_policy" "modern" {
  name            = "${local.name}-tls"
  profile         = "MODERN"
  min_tls_version = "TLS_1_2"

  depends_on = [google_project_service.enabled]
}

resource "google_compute_target_https_proxy" "https" {
  name             = "${local.name}-https"
  url_map          = google_compute_url_map.https.id
  ssl_certificates = [google_compute_managed_ssl_certificate.lb.id]
  ssl_policy       = google_compute_ssl_policy.modern.id
}

resource "google_compute_global_forwarding_rule" "https" {
  name                  = "${local.name}-https"
  load_balancing_scheme = "EXTERNAL_MANAGED"
  ip_protocol           = "TCP"
  port_range            = "443"
  ip_address            = google_compute_global_address.lb.id
  target                = google_compute_target_https_proxy.https.id
  labels                = local.labels
}

# ---------------------------------------------------------------- http -> https

resource "google_compute_url_map" "http_redirect" {
  name        = "${local.name}-http-redirect"
  description = "Redirect plain HTTP to HTTPS"

  default_url_redirect {
    https_redirect         = true
    redirect_response_code = "MOVED_PERMANENTLY_DEFAULT"
    strip_query            = false
  }

  depends_on = [google_project_service.enabled]
}

resource "google_compute_target_http_proxy" "http_redirect" {
  name    = "${local.name}-http-redirect"
  url_map = google_compute_url_map.http_redirect.id
}

resource "google_compute_global_forwarding_rule" "http_redirect" {
  name                  = "${local.name}-http-redirect"
  load_balancing_scheme = "EXTERNAL_MANAGED"
  ip_protocol           = "TCP"
  port_range            = "80"
  ip_address            = google_compute_global_address.lb.id
  target                = google_compute_target_http_proxy.http_redirect.id
  labels                = local.labels
}
