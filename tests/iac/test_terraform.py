"""What the deployment relies on in terraform/, read from python-hcl2's parse of the files.

No provider, no network: these pin down the properties a plan would have (one L4, scale to zero,
the startup probe within Cloud Run's limits, the CDN route, the warmup call, the alerts, the WIF
restriction) so a change that breaks one fails here before anyone runs `terraform apply`.
"""

from __future__ import annotations

import math
import re
from functools import cache
from pathlib import Path
from typing import Any

import hcl2
import pytest

ROOT = Path(__file__).resolve().parents[2]
TERRAFORM = ROOT / "terraform"
ENVIRONMENTS = ("staging", "production")
OPTIONS = hcl2.SerializationOptions(strip_string_quotes=True, explicit_blocks=False, with_comments=False)


@cache
def parse(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        parsed: dict[str, Any] = hcl2.load(handle, serialization_options=OPTIONS)
    return parsed


@cache
def config() -> dict[str, Any]:
    """Every block of terraform/*.tf, by kind: resources[type][name], variables[name], locals[name]..."""
    merged: dict[str, Any] = {"resource": {}, "data": {}, "variable": {}, "locals": {}, "output": {}, "terraform": []}
    for path in sorted(TERRAFORM.glob("*.tf")):
        for kind, blocks in parse(path).items():
            if kind in ("resource", "data"):
                for block in blocks:
                    for type_, named in block.items():
                        for name, body in named.items():
                            assert name not in merged[kind].setdefault(type_, {}), f"{type_}.{name} twice"
                            merged[kind][type_][name] = body
            elif kind in ("variable", "output"):
                for block in blocks:
                    merged[kind].update(block)
            elif kind == "locals":
                for block in blocks:
                    merged["locals"].update(block)
            elif kind == "terraform":
                merged["terraform"].extend(blocks)
    return merged


def resource(type_: str, name: str) -> dict[str, Any]:
    body: dict[str, Any] = config()["resource"][type_][name]
    return body


def resources(type_: str) -> dict[str, dict[str, Any]]:
    named: dict[str, dict[str, Any]] = config()["resource"].get(type_, {})
    return named


def one(blocks: Any) -> dict[str, Any]:
    """The single block of a nested block list (`template { ... }` parses as a one-item list)."""
    assert isinstance(blocks, list) and len(blocks) == 1, blocks
    block: dict[str, Any] = blocks[0]
    return block


def tfvars(environment: str) -> dict[str, Any]:
    return parse(TERRAFORM / "environments" / f"{environment}.tfvars")


def default(variable: str) -> Any:
    return config()["variable"][variable].get("default")


def effective(variable: str, environment: str) -> Any:
    """The value a variable takes in an environment: its tfvars entry, else its default."""
    values = tfvars(environment)
    return values[variable] if variable in values else default(variable)


def ref(expression: str) -> str:
    """`${var.x}` -> `var.x`: the reference an attribute is set to."""
    match = re.fullmatch(r"\$\{(.+)\}", expression)
    assert match, f"{expression!r} is not a single reference"
    return match.group(1)


def service() -> dict[str, Any]:
    return resource("google_cloud_run_v2_service", "cutout")


def template() -> dict[str, Any]:
    return one(service()["template"])


def container() -> dict[str, Any]:
    return one(template()["containers"])


def service_env() -> dict[str, Any]:
    env: dict[str, Any] = dict(config()["locals"]["service_env"])
    for entry in container().get("env", []):
        env[entry["name"]] = entry
    return env


# ---------------------------------------------------------------- Cloud Run


def test_one_nvidia_l4_per_instance() -> None:
    assert one(template()["node_selector"])["accelerator"] == "nvidia-l4"
    limits = one(container()["resources"])["limits"]
    assert limits["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_cpu_and_memory_meet_the_gpu_minimum(environment: str) -> None:
    limits = one(container()["resources"])["limits"]
    assert ref(limits["cpu"]) == "tostring(var.cpu)"
    assert limits["memory"] == "${var.memory_gib}Gi"
    assert effective("cpu", environment) >= 4
    assert effective("memory_gib", environment) >= 16


def test_cpu_always_allocated_with_startup_boost() -> None:
    resources_ = one(container()["resources"])
    assert resources_["cpu_idle"] is False
    assert resources_["startup_cpu_boost"] is True


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_scales_to_zero(environment: str) -> None:
    scaling = one(template()["scaling"])
    assert ref(scaling["min_instance_count"]) == "var.min_instances"
    assert ref(scaling["max_instance_count"]) == "var.max_instances"
    assert default("min_instances") == 0
    assert effective("min_instances", environment) == 0
    assert effective("max_instances", environment) >= 1


def test_concurrency_and_timeout_are_variables_within_cloud_run_limits() -> None:
    assert ref(template()["max_instance_request_concurrency"]) == "var.concurrency"
    assert template()["timeout"] == "${var.request_timeout_s}s"
    for environment in ENVIRONMENTS:
        assert 1 <= effective("concurrency", environment) <= 1000
        assert 30 <= effective("request_timeout_s", environment) <= 3600
    # The service gives up before Cloud Run cuts the connection.
    assert config()["locals"]["service_env"]["CUTOUT_REQUEST_TIMEOUT_S"] == "${tostring(var.request_timeout_s - 10)}"


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_startup_probe_on_ready_within_cloud_run_limits(environment: str) -> None:
    probe = one(container()["startup_probe"])
    http_get = one(probe["http_get"])
    assert http_get["path"] == "/ready"
    assert http_get["port"] == 8080
    for field in ("initial_delay_seconds", "period_seconds", "timeout_seconds", "failure_threshold"):
        assert probe[field] == f"${{var.startup_probe.{field}}}"
    values = effective("startup_probe", environment)
    assert values["failure_threshold"] * values["period_seconds"] <= 240
    assert 0 <= values["initial_delay_seconds"] <= 240
    assert 1 <= values["timeout_seconds"] <= values["period_seconds"]


def test_startup_probe_limit_is_also_validated() -> None:
    conditions = [rule["condition"] for rule in config()["variable"]["startup_probe"]["validation"]]
    assert "${var.startup_probe.failure_threshold * var.startup_probe.period_seconds <= 240}" in conditions


def test_liveness_probe_on_health() -> None:
    probe = one(container()["liveness_probe"])
    assert one(probe["http_get"])["path"] == "/health"


def test_container_listens_on_8080() -> None:
    assert one(container()["ports"])["container_port"] == 8080


def test_releases_own_image_traffic_and_tags_terraform_the_rest_of_the_template() -> None:
    ignored = one(service()["lifecycle"])["ignore_changes"]
    assert "${template[0].containers[0].image}" in ignored
    assert "traffic" in ignored
    # Everything else of the template stays Terraform's: ignoring the whole template (or env, scaling,
    # resources) would silently drop configuration changes.
    assert "template" not in ignored and "${template}" not in ignored
    for owned in ("env", "scaling", "resources", "startup_probe", "service_account"):
        assert not any(owned in str(entry) for entry in ignored), owned


def test_settings_reach_the_service_as_environment_variables() -> None:
    env = service_env()
    expected = {
        "CUTOUT_ENVIRONMENT",
        "CUTOUT_DEVICE",
        "CUTOUT_MODELS_DIR",
        "CUTOUT_CUTOUT_MODEL",
        "CUTOUT_DIFFUSION_EFFECTS",
        "CUTOUT_CACHE_BACKEND",
        "CUTOUT_GCS_BUCKET",
        "CUTOUT_CDN_URL",
        "CUTOUT_PUBLIC_URL",
        "CUTOUT_MAX_UPLOAD_BYTES",
        "CUTOUT_MAX_PIXELS",
        "CUTOUT_ALLOWED_ORIGINS",
        "CUTOUT_ALLOWED_ORIGIN_REGEX",
        "CUTOUT_TRUSTED_PROXY_HOPS",
        "CUTOUT_WARMUP_TOKEN",
        "CUTOUT_WARMUP_AUDIENCE",
        "CUTOUT_WARMUP_SERVICE_ACCOUNT",
        "CUTOUT_TRACE_EXPORT",
        "CUTOUT_METRICS_EXPORT",
        "CUTOUT_GCP_PROJECT",
        "CUTOUT_MAX_QUEUE",
        "CUTOUT_REQUEST_TIMEOUT_S",
        "CUTOUT_SHUTDOWN_GRACE_S",
    }
    assert expected <= set(env)
    assert env["CUTOUT_CACHE_BACKEND"] == "gcs"
    assert env["CUTOUT_DEVICE"] == "cuda"
    assert env["CUTOUT_MODELS_DIR"] == "/models"
    # Lists go as JSON, which service/settings.py accepts.
    assert env["CUTOUT_DIFFUSION_EFFECTS"] == "${jsonencode(var.diffusion_effects)}"
    assert env["CUTOUT_ALLOWED_ORIGINS"] == "${jsonencode(var.allowed_origins)}"


@pytest.mark.parametrize("environment", ["staging", "production"])
def test_shop_origins_are_accepted_by_the_service_settings(environment: str) -> None:
    """The origins and preview pattern each environment ships pass the service's own validation,
    and the pattern admits a theme preview but not a look-alike host."""
    from service.settings import Settings

    origins = effective("allowed_origins", environment)
    pattern = effective("allowed_origin_regex", environment)
    assert origins and all(origin.startswith("https://") and "example" not in origin for origin in origins)
    settings = Settings(allowed_origins=origins, allowed_origin_regex=pattern, environment="development")
    compiled = re.compile(settings.allowed_origin_regex)
    assert compiled.fullmatch("https://abc123-theme.shopifypreview.com")
    assert not compiled.fullmatch("https://evil.example/https://x.shopifypreview.com")
    assert not compiled.fullmatch("https://x.shopifypreview.com.evil.example")


def test_warmup_token_comes_from_secret_manager() -> None:
    token = service_env()["CUTOUT_WARMUP_TOKEN"]
    assert "value" not in token
    secret_ref = one(one(token["value_source"])["secret_key_ref"])
    assert secret_ref["secret"] == "${google_secret_manager_secret.warmup_token.secret_id}"
    # "latest", resolved at instance start: no revision pins a version that a rotation disables.
    assert secret_ref["version"] == "latest"
    grant = resource("google_secret_manager_secret_iam_member", "runtime_reads_warmup_token")
    assert grant["role"] == "roles/secretmanager.secretAccessor"
    assert grant["member"] == "${google_service_account.runtime.member}"


def test_client_ip_is_second_from_the_right_behind_the_load_balancer() -> None:
    # The global external ALB appends `<client-ip>,<lb-ip>`; Cloud Run behind a serverless NEG adds none.
    assert default("trusted_proxy_hops") == 2
    assert service_env()["CUTOUT_TRUSTED_PROXY_HOPS"] == "${tostring(var.trusted_proxy_hops)}"
    # That count holds for every request only if every request comes through the load balancer: the
    # run.app URL (one X-Forwarded-For entry, no Cloud Armor) is closed to the internet.
    assert service()["ingress"] == "${var.ingress}"
    assert default("ingress") == "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER"
    for environment in ENVIRONMENTS:
        assert effective("ingress", environment) == "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER"


@pytest.mark.parametrize(("environment", "usd_per_second"), [("staging", 0.0003947), ("production", 0.0004989)])
def test_cost_metric_uses_the_instance_price_of_the_environment(environment: str, usd_per_second: float) -> None:
    # docs/cost.md: L4 $0.0001867/s without zonal redundancy, $0.0002909/s with; $0.000018/vCPU-s; $0.000002/GiB-s.
    locals_ = config()["locals"]
    assert locals_["l4_usd_per_second"] == "${var.gpu_zonal_redundancy_disabled ? 0.0001867 : 0.0002909}"
    assert service_env()["CUTOUT_L4_USD_PER_SECOND"] == "${tostring(local.instance_usd_per_second)}"
    gpu = 0.0001867 if effective("gpu_zonal_redundancy_disabled", environment) else 0.0002909
    price = gpu + effective("cpu", environment) * 0.000018 + effective("memory_gib", environment) * 0.000002
    assert price == pytest.approx(usd_per_second)


def test_shutdown_grace_below_cloud_runs_sigkill() -> None:
    assert default("shutdown_grace_s") < 10


# ---------------------------------------------------------------- bucket and CDN


def test_results_bucket_is_private_uniform_and_expires_results() -> None:
    bucket = resource("google_storage_bucket", "results")
    assert bucket["uniform_bucket_level_access"] is True
    assert bucket["public_access_prevention"] == "enforced"
    # The cache's rule; the kept pictures' rules are evaluated in test_retention.py.
    (rule,) = [
        r for r in bucket["lifecycle_rule"] if one(r["condition"]).get("matches_prefix") == "${local.public_prefixes}"
    ]
    assert one(rule["condition"])["age"] == "${var.result_retention_days}"
    assert one(rule["action"])["type"] == "Delete"
    for environment in ENVIRONMENTS:
        assert effective("result_retention_days", environment) >= 1


def test_nothing_is_granted_to_all_users() -> None:
    text = "\n".join(path.read_text(encoding="utf-8") for path in TERRAFORM.glob("*.tf"))
    assert '"allUsers"' not in text
    assert '"allAuthenticatedUsers"' not in text


def test_bucket_is_read_publicly_only_through_the_cdn() -> None:
    grant = resource("google_storage_bucket_iam_member", "cdn_reads_public_prefixes")
    assert grant["role"] == "roles/storage.objectViewer"
    assert grant["member"].endswith("@https-lb.iam.gserviceaccount.com")
    assert "startsWith" in one(grant["condition"])["expression"]
    assert config()["locals"]["public_prefixes"] == ["results/", "masks/"]


def test_cdn_on_the_bucket_backend_not_on_the_api() -> None:
    bucket_backend = resource("google_compute_backend_bucket", "results")
    assert bucket_backend["enable_cdn"] is True
    assert bucket_backend["bucket_name"] == "${google_storage_bucket.results.name}"
    assert one(bucket_backend["cdn_policy"])["cache_mode"] == "FORCE_CACHE_ALL"
    assert resource("google_compute_backend_service", "api")["enable_cdn"] is False


def test_cache_path_routes_to_the_bucket_with_the_prefix_stripped() -> None:
    url_map = resource("google_compute_url_map", "https")
    assert url_map["default_service"] == "${google_compute_backend_service.api.id}"
    matcher = one(url_map["path_matcher"])
    assert matcher["default_service"] == "${google_compute_backend_service.api.id}"
    rule = next(rule for rule in matcher["route_rules"] if rule["priority"] == 1)
    assert one(rule["match_rules"])["prefix_match"] == "/cache/"
    assert rule["service"] == "${google_compute_backend_bucket.results.id}"
    rewrite = one(one(rule["route_action"])["url_rewrite"])
    assert rewrite["path_prefix_rewrite"] == "/"


def test_api_reaches_cloud_run_through_a_serverless_neg_with_cloud_armor() -> None:
    neg = resource("google_compute_region_network_endpoint_group", "cutout")
    assert neg["network_endpoint_type"] == "SERVERLESS"
    assert one(neg["cloud_run"])["service"] == "${google_cloud_run_v2_service.cutout.name}"
    backend = resource("google_compute_backend_service", "api")
    assert backend["load_balancing_scheme"] == "EXTERNAL_MANAGED"
    assert one(backend["backend"])["group"] == "${google_compute_region_network_endpoint_group.cutout.id}"
    assert backend["security_policy"] == "${google_compute_security_policy.api.id}"


def test_https_with_a_managed_certificate_on_a_global_external_alb() -> None:
    certificate = resource("google_compute_managed_ssl_certificate", "lb")
    assert one(certificate["managed"])["domains"] == ["${var.domain}"]
    rule = resource("google_compute_global_forwarding_rule", "https")
    assert rule["load_balancing_scheme"] == "EXTERNAL_MANAGED"
    assert rule["port_range"] == "443"
    proxy = resource("google_compute_target_https_proxy", "https")
    assert proxy["ssl_certificates"] == ["${google_compute_managed_ssl_certificate.lb.id}"]
    redirect = resource("google_compute_url_map", "http_redirect")
    assert one(redirect["default_url_redirect"])["https_redirect"] is True


def test_cloud_armor_throttles_per_client_ip() -> None:
    policy = resource("google_compute_security_policy", "api")
    throttles = [rule for rule in policy["rule"] if rule["action"] == "throttle"]
    assert len(throttles) == 1
    options = one(throttles[0]["rate_limit_options"])
    assert options["enforce_on_key"] == "IP"
    assert options["exceed_action"] == "deny(429)"
    threshold = one(options["rate_limit_threshold"])
    assert threshold["count"] == "${var.armor_rate_limit.count}"
    assert threshold["interval_sec"] == "${var.armor_rate_limit.interval_sec}"
    default_rules = [rule for rule in policy["rule"] if rule["priority"] == 2147483647]
    assert default_rules and default_rules[0]["action"] == "allow"


# ---------------------------------------------------------------- warmup


def test_scheduler_posts_warmup_with_an_oidc_token_the_service_accepts() -> None:
    job = resource("google_cloud_scheduler_job", "warmup")
    target = one(job["http_target"])
    assert target["http_method"] == "POST"
    assert target["uri"] == "${google_cloud_run_v2_service.cutout.uri}/warmup"
    token = one(target["oidc_token"])
    assert token["service_account_email"] == "${google_service_account.warmup.email}"
    assert token["audience"] == "${local.warmup_audience}"
    env = service_env()
    assert env["CUTOUT_WARMUP_AUDIENCE"] == "${local.warmup_audience}"
    assert env["CUTOUT_WARMUP_SERVICE_ACCOUNT"] == "${google_service_account.warmup.email}"


def test_warmup_runs_on_a_business_hours_cron() -> None:
    job = resource("google_cloud_scheduler_job", "warmup")
    assert job["schedule"] == "${var.warmup_schedule}"
    fields = default("warmup_schedule").split()
    assert len(fields) == 5
    hour, weekday = fields[1], fields[4]
    assert "-" in hour and weekday == "1-5"
    assert effective("warmup_schedule", "production").split()[4] == "1-5"


# ---------------------------------------------------------------- monitoring, budget


def threshold(policy: str) -> dict[str, Any]:
    return one(one(resource("google_monitoring_alert_policy", policy)["conditions"])["condition_threshold"])


def alert_filters() -> dict[str, str]:
    filters = {}
    for name, policy in resources("google_monitoring_alert_policy").items():
        condition = one(policy["conditions"])
        if "condition_threshold" in condition:
            body = one(condition["condition_threshold"])
            filters[name] = body["filter"] + " / " + body.get("denominator_filter", "")
        else:
            filters[name] = one(condition["condition_matched_log"])["filter"]
    return filters


def test_alert_policies_cover_latency_errors_cost_startup_and_cache() -> None:
    filters = alert_filters()
    assert "loadbalancing.googleapis.com/https/request_count" in filters["lb_errors"]
    assert "monitoring.googleapis.com/uptime_check/check_passed" in filters["uptime"]
    assert "run.googleapis.com/varlog/system" in filters["instance_failures"]
    assert "run.googleapis.com/request_latencies" in filters["latency_p95"]
    assert 'response_code_class = "5xx"' in filters["error_ratio"]
    assert "run.googleapis.com/container/instance_count" in filters["instance_count"]
    assert "run.googleapis.com/container/startup_latencies" in filters["startup_latency"]
    assert "google_monitoring_metric_descriptor.cache_requests.type" in filters["cache_hit_ratio"]
    assert 'outcome = "hit"' in filters["cache_hit_ratio"]
    assert one(threshold("latency_p95")["aggregations"])["cross_series_reducer"] == "REDUCE_PERCENTILE_95"
    assert threshold("error_ratio")["denominator_filter"]
    assert threshold("cache_hit_ratio")["comparison"] == "COMPARISON_LT"


def test_every_alert_notifies_the_configured_channels() -> None:
    for policy in resources("google_monitoring_alert_policy").values():
        assert policy["notification_channels"] == "${var.notification_channel_ids}"


def test_cache_metric_is_the_services_custom_metric() -> None:
    descriptor = resource("google_monitoring_metric_descriptor", "cache_requests")
    assert descriptor["type"] == "custom.googleapis.com/cutout/cache_requests"
    assert one(descriptor["labels"])["key"] == "outcome"


def test_dashboard_exists() -> None:
    assert "cutout" in resources("google_monitoring_dashboard")


def test_budget_alerts_at_thresholds() -> None:
    budget = resource("google_billing_budget", "project")
    assert one(budget["all_updates_rule"])["monitoring_notification_channels"] == "${var.notification_channel_ids}"
    assert default("budget_alert_thresholds") == [0.5, 0.9, 1.0]
    forecast = one(budget["threshold_rules"])
    assert forecast["spend_basis"] == "FORECASTED_SPEND"


# ---------------------------------------------------------------- identities


def test_workload_identity_accepts_only_this_repository() -> None:
    provider = resource("google_iam_workload_identity_pool_provider", "github")
    assert one(provider["oidc"])["issuer_uri"] == "https://token.actions.githubusercontent.com"
    condition = provider["attribute_condition"]
    assert "assertion.repository == '${var.github_repository}'" in condition
    assert "assertion.sub == 'repo:${var.github_repository}:environment:${var.environment}'" in condition
    assert provider["attribute_mapping"]["attribute.repository"] == "assertion.repository"
    binding = resource("google_service_account_iam_member", "github_deploys")
    assert binding["role"] == "roles/iam.workloadIdentityUser"
    assert binding["member"].endswith("/attribute.repository/${var.github_repository}")


def test_no_broad_project_roles() -> None:
    roles = [grant["role"] for grant in config()["locals"]["project_roles"].values()]
    roles += [grant["role"] for grant in resources("google_project_iam_member").values() if "role" in grant]
    for role in roles:
        assert role not in ("roles/owner", "roles/editor", "roles/viewer"), role
        assert not role.endswith(".admin"), role
    runtime = {g["role"] for g in config()["locals"]["project_roles"].values() if "runtime" in g["member"]}
    assert runtime == {"roles/monitoring.metricWriter", "roles/cloudtrace.agent"}


def test_service_runs_as_its_own_account() -> None:
    assert template()["service_account"] == "${google_service_account.runtime.email}"
    assert service()["invoker_iam_disabled"] is True


# ---------------------------------------------------------------- environments and hygiene


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_tfvars_set_every_required_variable_and_nothing_unknown(environment: str) -> None:
    values = tfvars(environment)
    variables = config()["variable"]
    required = {name for name, body in variables.items() if "default" not in body}
    assert required <= set(values), f"{environment}.tfvars lacks {sorted(required - set(values))}"
    assert set(values) <= set(variables), f"{environment}.tfvars sets unknown {sorted(set(values) - set(variables))}"
    assert values["environment"] == environment


def test_providers_are_pinned() -> None:
    providers = one(one(config()["terraform"])["required_providers"])
    assert providers["google"]["source"] == "hashicorp/google"
    assert providers["google"]["version"]
    assert providers["random"]["version"]


def test_every_checkov_skip_says_why() -> None:
    skips = []
    for path in [*TERRAFORM.glob("*.tf"), ROOT / "Dockerfile"]:
        for line in path.read_text(encoding="utf-8").splitlines():
            if "checkov:skip" in line:
                skips.append((path.name, line.strip()))
    assert skips
    for name, line in skips:
        match = re.fullmatch(r"#\s*checkov:skip=(CKV2?_[A-Z0-9]+_\d+):(.+)", line)
        assert match, f"{name}: {line!r} is not `#checkov:skip=<id>:<reason>`"
        assert len(match.group(2).split()) >= 8, f"{name}: the reason for {match.group(1)} is too short"


# ---------------------------------------------------------------- variable validations, evaluated
#
# Terraform evaluates these when it plans; there is no terraform binary here, so the subset of HCL the
# conditions use (comparisons, && ||, floor, length, contains, can(regex(...)), string templates, one
# `[for x in xs : cond]`) is translated to Python and run against each environment's values. A tfvars
# that a validation would reject, or a validation that stops rejecting what it must, fails here.


class _Vars:
    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    def __getattr__(self, name: str) -> Any:
        value = self._values[name]
        return _Vars(value) if isinstance(value, dict) else value


_NO_MATCH = object()


def _regex(pattern: str, value: str) -> Any:
    match = re.search(pattern, value)
    return match.group(0) if match else _NO_MATCH


def _hcl_to_python(condition: str) -> str:
    expression = ref(condition)
    # "${a}-${b}" templates inside the expression become f-strings.
    expression = re.sub(r'"([^"]*\$\{[^"]*)"', lambda m: 'f"' + m.group(1).replace("${", "{") + '"', expression)
    expression = re.sub(r"\[for (\w+) in ([\w.]+) : (.+)\]", r"[\3 for \1 in \2]", expression)
    expression = expression.replace("&&", " and ").replace("||", " or ")
    return re.sub(r"\btrue\b", "True", re.sub(r"\bfalse\b", "False", expression))


def validation_errors(values: dict[str, Any]) -> list[str]:
    """error_message of every variable validation that `values` (defaults filled in) fails."""
    variables = config()["variable"]
    filled = {name: values.get(name, body.get("default")) for name, body in variables.items()}
    scope = {
        "var": _Vars(filled),
        "floor": math.floor,
        "length": len,
        "contains": lambda items, item: item in items,
        "alltrue": all,
        "regex": _regex,
        "can": lambda value: value is not _NO_MATCH,
    }
    failed = []
    for name, body in variables.items():
        if filled[name] is None:
            continue
        for rule in body.get("validation", []):
            if not eval(_hcl_to_python(rule["condition"]), scope):
                failed.append(f"{name}: {rule['error_message']}")
    return failed


def environment_values(tfvars_of: str, **overrides: Any) -> dict[str, Any]:
    return {**tfvars(tfvars_of), **overrides}


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_tfvars_pass_every_validation(environment: str) -> None:
    assert validation_errors(environment_values(environment)) == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # Cloud Run's CPU/memory table: 4 vCPU allow at most 16 GiB, 6 vCPU 24 GiB.
        ({"cpu": 4, "memory_gib": 32}, "memory_gib exceeds"),
        ({"cpu": 6, "memory_gib": 28}, "memory_gib exceeds"),
        ({"cpu": 8, "memory_gib": 8}, "memory_gib must be a whole number from 16"),
        # A canary and the serving revision each scale to max_instances; quota counts both.
        ({"max_instances": 4, "gpu_quota": 7}, "gpu_quota must be at least 2 x max_instances"),
        # Alerts nobody hears.
        ({"notification_channel_ids": []}, "need at least one notification channel"),
        ({"notification_channel_ids": ["1234"]}, "must be full names"),
        # <name>-warmup would be a 31-character service account id.
        ({"service_name": "a" * 24}, "service_name must be 2-23"),
        ({"project_id": "p" * 40, "service_name": "a" * 23}, "bucket name"),
        ({"environment": "prod"}, "environment must be"),
    ],
)
def test_validations_reject_what_the_apis_would(overrides: dict[str, Any], message: str) -> None:
    errors = validation_errors(environment_values("production", **overrides))
    assert any(message in error for error in errors), errors


@pytest.mark.parametrize("cpu", [4, 6, 8])
def test_cpu_and_memory_validation_matches_cloud_runs_table(cpu: int) -> None:
    # https://cloud.google.com/run/docs/configuring/services/memory-limits: more than 16 GiB needs
    # 6 vCPU, more than 24 GiB 8 vCPU; a GPU needs at least 16 GiB.
    for memory in range(1, 40):
        allowed = 16 <= memory <= 32 and memory <= {4: 16, 6: 24, 8: 32}[cpu]
        errors = validation_errors(environment_values("production", cpu=cpu, memory_gib=memory))
        assert (not any(error.startswith("memory_gib") for error in errors)) == allowed, (cpu, memory)


def test_development_may_run_without_notification_channels() -> None:
    values = environment_values("staging", environment="development", notification_channel_ids=[])
    assert validation_errors(values) == []


def test_every_alert_and_the_budget_notify_channels_that_must_exist() -> None:
    rules = [rule["condition"] for rule in config()["variable"]["notification_channel_ids"]["validation"]]
    assert any("length(var.notification_channel_ids) >= 1" in rule for rule in rules)
    for environment in ENVIRONMENTS:
        assert len(effective("notification_channel_ids", environment)) >= 1


# ---------------------------------------------------------------- names, API enablement


def _account_suffixes() -> list[str]:
    suffixes = []
    for account in resources("google_service_account").values():
        match = re.fullmatch(r"\$\{local\.name\}(-[a-z0-9-]+)", account["account_id"])
        assert match, account["account_id"]
        suffixes.append(match.group(1))
    return suffixes


def _bucket_suffixes() -> list[str]:
    suffixes = []
    for bucket in resources("google_storage_bucket").values():
        match = re.fullmatch(r"\$\{var\.project_id\}-\$\{local\.name\}(-[a-z0-9-]+)", bucket["name"])
        assert match, bucket["name"]
        suffixes.append(match.group(1))
    return suffixes


def test_derived_names_fit_their_limits_for_any_name_the_validation_allows() -> None:
    assert config()["locals"]["name"] == "${var.service_name}"
    longest_name = "a" * 23  # the longest service_name the validation accepts
    assert validation_errors(environment_values("production", service_name=longest_name)) == []
    for suffix in _account_suffixes():
        # IAM service account ids: 6-30 characters.
        assert len("ab" + suffix) >= 6 and len(longest_name + suffix) <= 30, suffix
    longest_project = "p" * 30  # GCP project ids are at most 30 characters
    for suffix in _bucket_suffixes():
        assert len(f"{longest_project}-{longest_name}{suffix}") <= 63, suffix


_REFERENCE = re.compile(r"\b(google_[a-z0-9_]+|random_[a-z_]+)\.([a-z0-9_]+)\b")


def test_every_resource_waits_for_the_apis_it_needs() -> None:
    # On an empty project a resource created in parallel with `google_project_service` races the API
    # enablement and fails the first apply. Every google_* resource must depend on it, directly
    # (depends_on) or through a resource it references that does.
    bodies = {
        f"{type_}.{name}": body
        for type_, named in config()["resource"].items()
        for name, body in named.items()
        if type_ != "google_project_service"
    }

    def references(body: Any) -> set[str]:
        return {f"{t}.{n}" for t, n in _REFERENCE.findall(repr(body))}

    waits: dict[str, bool] = {}

    def waits_for_apis(address: str, seen: frozenset[str] = frozenset()) -> bool:
        if address not in waits:
            body = bodies[address]
            direct = "${google_project_service.enabled}" in body.get("depends_on", [])
            waits[address] = direct or any(
                waits_for_apis(other, seen | {address})
                for other in references(body) - seen - {address}
                if other in bodies
            )
        return waits[address]

    # Project IAM runs on Cloud Resource Manager, which step 1 of docs/deployment.md enables by hand.
    exempt = {"google_project_iam_member"}
    late = [
        address
        for address in bodies
        if address.startswith("google_") and address.split(".")[0] not in exempt and not waits_for_apis(address)
    ]
    assert late == [], f"create these only after the APIs are enabled (depends_on): {late}"


# ---------------------------------------------------------------- monitoring filters


def _locals_text() -> dict[str, str]:
    return {name: value for name, value in config()["locals"].items() if isinstance(value, str)}


def resolved(filter_: str) -> str:
    """A filter with `${local.x}` replaced by the locals' text (repeatedly, locals use locals)."""
    texts = _locals_text()
    for _ in range(5):
        filter_ = re.sub(r"\$\{local\.(\w+)\}", lambda m: texts[m.group(1)], filter_)
    return filter_


def every_monitoring_filter() -> list[tuple[str, str]]:
    """(where, filter) for every alert condition filter, denominator and log filter, and every chart."""
    found = []
    for name, policy in resources("google_monitoring_alert_policy").items():
        for condition in policy["conditions"]:
            for kind in ("condition_threshold", "condition_absent", "condition_matched_log"):
                for body in condition.get(kind, []):
                    for field in ("filter", "denominator_filter"):
                        if field in body:
                            found.append((f"{name}.{kind}.{field}", body[field]))
    for chart in config()["locals"]["dashboard_charts"]:
        if isinstance(chart["series"], str):  # a `[for ... : {...}]` expression: read its filter out
            for filter_ in re.findall(r'filter = "((?:[^"\\]|\\.)*)"', chart["series"]):
                found.append((f"dashboard: {chart['title']}", filter_.replace('\\"', '"')))
        else:
            for series in chart["series"]:
                found.append((f"dashboard: {chart['title']}", series["query"]["filter"]))
    return found


def test_every_monitoring_filter_names_its_resource_type() -> None:
    # Cloud Monitoring answers 400 to an alert whose filter (ratio numerators and denominators
    # included) does not restrict resource.type: terraform-provider-google #4165, #7179.
    filters = every_monitoring_filter()
    assert len(filters) >= 20
    missing = [where for where, filter_ in filters if not re.search(r'resource\.type\s*=\s*"\w+"', resolved(filter_))]
    assert missing == [], f"these filters name no resource.type: {missing}"


def test_custom_metrics_are_filtered_on_the_resource_the_service_writes() -> None:
    source = (ROOT / "service" / "metrics.py").read_text(encoding="utf-8")
    assert '"type": "generic_task"' in source
    for where, filter_ in every_monitoring_filter():
        if "custom.googleapis.com/" in resolved(filter_):
            assert 'resource.type = "generic_task"' in resolved(filter_), where


# ---------------------------------------------------------------- health: uptime, crashes, LB 5xx


def test_uptime_check_watches_the_public_url_without_waking_a_gpu() -> None:
    check = resource("google_monitoring_uptime_check_config", "public")
    monitored = one(check["monitored_resource"])
    assert monitored["type"] == "uptime_url"
    assert monitored["labels"]["host"] == "${var.domain}"
    http_check = one(check["http_check"])
    assert http_check["use_ssl"] is True and http_check["validate_ssl"] is True and http_check["port"] == 443
    # Through the load balancer's CDN route to the bucket: an API path would start a GPU instance
    # every few minutes and keep one running around the clock.
    path = config()["locals"]["uptime_check_path"]
    assert path.startswith("/cache/results/")
    assert one(http_check["accepted_response_status_codes"])["status_value"] == 404
    alert = threshold("uptime")
    assert "${google_monitoring_uptime_check_config.public.uptime_check_id}" in alert["filter"]


def test_instance_failures_alert_on_the_system_log() -> None:
    policy = resource("google_monitoring_alert_policy", "instance_failures")
    log_filter = resolved(one(one(policy["conditions"])["condition_matched_log"])["filter"])
    for piece in (
        'log_id("run.googleapis.com/varlog/system")',
        "severity >= ERROR",
        'resource.type = "cloud_run_revision"',
        'textPayload:"Container called exit(1)"',
    ):
        assert piece in log_filter
    assert "exit(0)" not in log_filter  # a normal shutdown after SIGTERM is not a crash
    assert 'resource.labels.service_name = "${var.service_name}"' in log_filter
    # Log-match alerts need a notification rate limit, or the API refuses them.
    assert one(one(policy["alert_strategy"])["notification_rate_limit"])["period"]


def test_load_balancer_5xx_ratio_alert_is_scoped_to_this_url_map() -> None:
    condition = threshold("lb_errors")
    assert "metric.label.response_code_class = 500" in condition["filter"]
    assert config()["locals"]["lb_filter"].endswith('url_map_name = "${google_compute_url_map.https.name}"')
    assert condition["denominator_filter"]


# ---------------------------------------------------------------- releases: canary, quota, secrets


def test_canary_is_routed_through_the_load_balancer_and_cloud_armor() -> None:
    locals_ = config()["locals"]
    neg = resource("google_compute_region_network_endpoint_group", "canary")
    assert neg["network_endpoint_type"] == "SERVERLESS"
    cloud_run = one(neg["cloud_run"])
    assert cloud_run["service"] == "${google_cloud_run_v2_service.cutout.name}"
    assert cloud_run["tag"] == "${local.canary_tag}"
    backend = resource("google_compute_backend_service", "canary")
    assert backend["security_policy"] == "${google_compute_security_policy.api.id}"
    assert one(backend["backend"])["group"] == "${google_compute_region_network_endpoint_group.canary.id}"
    rules = one(resource("google_compute_url_map", "https")["path_matcher"])["route_rules"]
    canary = [rule for rule in rules if rule["service"] == "${google_compute_backend_service.canary.id}"]
    assert len(canary) == 1
    assert one(canary[0]["match_rules"])["prefix_match"] == "${local.canary_path}"
    assert one(one(canary[0]["route_action"])["url_rewrite"])["path_prefix_rewrite"] == "/"
    # scripts/deploy.py tags and smoke-tests exactly this.
    script = (ROOT / "scripts" / "deploy.py").read_text(encoding="utf-8")
    assert f'CANARY_TAG = "{locals_["canary_tag"]}"' in script
    assert f'CANARY_PATH = "{locals_["canary_path"]}"' in script


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_gpu_quota_covers_a_canary_beside_the_serving_revision(environment: str) -> None:
    assert effective("gpu_quota", environment) >= 2 * effective("max_instances", environment)


def test_secret_versions_outlive_the_revisions_that_use_them() -> None:
    version = resource("google_secret_manager_secret_version", "warmup_token")
    # Replaced versions are disabled after the new one exists, never before.
    assert one(version["lifecycle"])["create_before_destroy"] is True
    assert version["deletion_policy"] in ("DISABLE", "ABANDON")
    # The first revision reads "latest" at start: it must exist first.
    assert "${google_secret_manager_secret_version.warmup_token}" in service()["depends_on"]


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_startup_probe_budget_covers_an_l4_cold_start_of_the_cutout_stage(environment: str) -> None:
    # L4 estimate: image pull + imports + 0.2 GB of cutout weights <= 120 s (the diffusion pipelines
    # load after /ready). The budget must cover it with room, within Cloud Run's 240 s.
    probe = effective("startup_probe", environment)
    budget = probe["initial_delay_seconds"] + probe["failure_threshold"] * probe["period_seconds"]
    assert 180 <= budget <= 240 + 240
    assert probe["failure_threshold"] * probe["period_seconds"] <= 240
    # Probed often enough that a ready instance gets traffic within seconds.
    assert probe["period_seconds"] <= 10


def test_liveness_probe_tolerates_a_busy_instance() -> None:
    probe = one(container()["liveness_probe"])
    assert probe["timeout_seconds"] <= probe["period_seconds"]
    # A restart only after a minute or more without any answer: background diffusion loading can
    # slow /health down, and a restart throws away a warm GPU instance.
    assert probe["failure_threshold"] * probe["period_seconds"] >= 60
