"""docker-compose.yml against the code, without a Docker engine (none runs in CI).

Static checks read the compose file, deploy/Dockerfile and the Prometheus, collector and
Grafana files, and compare them with what the code defines and reads: modules import,
options exist, addresses and ports line up, env vars are read, metric names are defined.
The smoke test runs the compose commands themselves (hosts and ports remapped to
loopback) on a private redis-server, sends shop load, breaks the downstream, and checks
that every series the dashboard queries is served for real, and that the worker exports
spans over OTLP when the exporter is installed (and stays quiet when it is not).
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import tomllib
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from examples import downstream
from resilient_tasks.telemetry import EVENTS, STATE_CODES
from resilient_tasks.testing import RedisServer, free_port, wait_until

yaml = pytest.importorskip("yaml", reason="PyYAML parses docker-compose.yml (pyyaml in the dev extra)")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
IMAGE = {"context": ".", "dockerfile": "deploy/Dockerfile"}
APP = {name: s for name, s in SERVICES.items() if s.get("build") == IMAGE}
WORKERS = {name: s for name, s in APP.items() if s["command"][3:4] == ["worker"]}
PROMETHEUS = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
COLLECTOR = yaml.safe_load((ROOT / "deploy/otel-collector.yaml").read_text())
DATASOURCES = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/datasources.yml").read_text())
PROVIDERS = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/dashboards.yml").read_text())
DASHBOARD = json.loads((ROOT / "deploy/grafana/dashboards/resilience.json").read_text())
EXPRS = [t["expr"] for panel in DASHBOARD["panels"] for t in panel["targets"]]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
METRIC = re.compile(r"\b((?:resilience|flower|otel)_[a-z0-9_]+)\b")
#: What the code reads, by the names the brief lists (workers/app.py, runtime.py, ...).
WORKER_ENV = {
    "RT_BROKER_URL",
    "RT_RESULT_BACKEND",
    "RESILIENT_TASKS_REDIS_URL",
    "RT_DOWNSTREAM_URL",
    "RESILIENT_TASKS_POLICIES",
    "PROMETHEUS_MULTIPROC_DIR",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_SERVICE_NAME",
}


def _dockerfile() -> list[tuple[str, list[str]]]:
    """(instruction, arguments) per logical line of deploy/Dockerfile."""
    text = re.sub(r"\\\n", " ", (ROOT / "deploy/Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), shlex.split(line.split(None, 1)[1])) for line in lines]


DOCKERFILE = _dockerfile()
WORKDIR = next(args[0] for kind, args in DOCKERFILE if kind == "WORKDIR")
IMAGE_ENV = dict(arg.split("=", 1) for kind, args in DOCKERFILE if kind == "ENV" for arg in args)


def option(command: list[str], name: str) -> str | None:
    """The value of ``name`` in a command (``--x v`` or ``--x=v``)."""
    for i, token in enumerate(command):
        if token == name and i + 1 < len(command):
            return command[i + 1]
        if token.startswith(name + "="):
            return token.split("=", 1)[1]
    return None


def modules(command: list[str]) -> list[str]:
    """Python modules a command imports: ``-A``, ``-m`` and ``--include``."""
    return [m for flag in ("-A", "-m", "--include") for m in (option(command, flag) or "").split(",") if m]


def host_port(address: str) -> tuple[str, int]:
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    assert parsed.hostname and parsed.port, address
    return parsed.hostname, parsed.port


def local_env(service: str, replace: dict[str, str] | None = None) -> dict[str, str]:
    """The service's environment on this machine: the image's paths mapped to the repo."""
    replace = {f"{WORKDIR}/": f"{ROOT}/", **(replace or {})}
    ours = ("RT_", "RESILIENT_TASKS_", "PROMETHEUS_", "OTEL_", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env["PYTHONPATH"] = IMAGE_ENV["PYTHONPATH"].replace(WORKDIR, str(ROOT))
    for name, value in (SERVICES[service].get("environment") or {}).items():
        for old, new in replace.items():
            value = str(value).replace(old, new)
        env[name] = str(value)
    return env


def local_command(command: list[str], ports: dict[str, str] | None = None) -> list[str]:
    """A compose command for this interpreter, with container ports swapped for free ones."""
    ports = ports or {}
    head = {"celery": [sys.executable, "-m", "celery"], "python": [sys.executable]}[command[0]]
    tokens = []
    for token in command[1:]:
        name, eq, value = token.partition("=")
        tokens.append(
            f"{name}={ports.get(value, value)}" if eq and token.startswith("--") else ports.get(token, token)
        )
    return head + tokens


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{shlex.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


# -- static checks ----------------------------------------------------------------------


def test_app_services_run_one_image_built_from_deploy_dockerfile() -> None:
    assert set(APP) == {"downstream", "worker-1", "worker-2", "flower"}
    assert set(WORKERS) == {"worker-1", "worker-2"}
    assert DOCKERFILE[0] == ("FROM", ["python:3.11-slim"])
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"


@pytest.mark.parametrize("service", sorted(APP))
def test_every_module_named_in_a_command_imports(service: str) -> None:
    found = modules(SERVICES[service]["command"])
    assert found, f"{service}: no -A, -m or --include module in its command"
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)"
    run([sys.executable, "-c", code, *found], local_env(service))
    conf = option(SERVICES[service]["command"], "--conf")  # Flower executes its config file
    if conf is not None:
        run(
            [sys.executable, "-c", "import runpy, sys; runpy.run_path(sys.argv[1])", conf], local_env(service)
        )


@pytest.mark.parametrize("service", sorted(APP))
def test_every_option_in_a_command_exists(service: str) -> None:
    command = SERVICES[service]["command"]
    used = [token.split("=", 1)[0] for token in command if token.startswith("--")]
    if command[0] == "python":
        known = run([*local_command(command[:3]), "--help"], local_env(service)).stdout
        missing = [name for name in used if name not in known]
    elif command[3] == "flower":  # Flower hands its options to tornado, not to click
        run([*local_command(command[:4]), "--help"], local_env(service))
        code = "import json; from flower.options import options; print(json.dumps(sorted(options.as_dict())))"
        known_names = json.loads(run([sys.executable, "-c", code], local_env(service)).stdout)
        missing = [name for name in used if name[2:].replace("-", "_") not in known_names]
    else:  # --resilience-metrics-port appears only once -A loads the app that adds it
        known = run([*local_command(command[:4]), "--help"], local_env(service)).stdout
        missing = [name for name in used if not re.search(rf"{re.escape(name)}\b", known)]
    assert not missing, f"{service}: {missing} not accepted by {' '.join(command[:4])}"


def test_every_env_var_a_service_sets_is_read_by_the_code() -> None:
    code = "\n".join(
        path.read_text()
        for folder in ("resilient_tasks", "workers", "examples")
        for path in (ROOT / folder).rglob("*.py")
    )
    for name, service in APP.items():
        for var in service.get("environment") or {}:
            assert f'"{var}"' in code, f"{name} sets {var}, which no code reads"
    for name, service in WORKERS.items():
        assert set(service["environment"]) >= WORKER_ENV, (
            f"{name} misses {WORKER_ENV - set(service['environment'])}"
        )
    # Flower serves prometheus-client's default registry from one process: multiprocess
    # mode there would hide its own counters.
    assert "PROMETHEUS_MULTIPROC_DIR" not in SERVICES["flower"]["environment"]


def test_addresses_name_services_and_ports_line_up() -> None:
    downstream_port = int(option(SERVICES["downstream"]["command"], "--port") or 0)
    assert option(SERVICES["downstream"]["command"], "--host") == "0.0.0.0"  # reachable from other containers
    grpc_port = host_port(COLLECTOR["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])[1]
    for name in (*WORKERS, "flower"):
        env = SERVICES[name]["environment"]
        for var in ("RT_BROKER_URL", "RESILIENT_TASKS_REDIS_URL", "RT_RESULT_BACKEND"):
            assert host_port(env[var]) == ("redis", 6379), (name, var)
        assert host_port(env["RT_DOWNSTREAM_URL"]) == ("downstream", downstream_port), name
        if "OTEL_EXPORTER_OTLP_ENDPOINT" in env:
            assert host_port(env["OTEL_EXPORTER_OTLP_ENDPOINT"]) == ("otel-collector", grpc_port), name
    assert "redis" in SERVICES and option(SERVICES["redis"]["command"], "--port") is None  # default 6379
    jobs = {
        job["job_name"]: {t for c in job["static_configs"] for t in c["targets"]}
        for job in PROMETHEUS["scrape_configs"]
    }
    metrics_ports = {name: option(s["command"], "--resilience-metrics-port") for name, s in WORKERS.items()}
    assert jobs["resilient-tasks-workers"] == {f"{name}:{port}" for name, port in metrics_ports.items()}
    for name, port in metrics_ports.items():
        assert port in [str(p) for p in WORKERS[name]["expose"]], f"{name} does not expose {port}"
    flower_port = option(SERVICES["flower"]["command"], "--port")
    assert jobs["flower"] == {f"flower:{flower_port}"}
    collector_port = host_port(COLLECTOR["exporters"]["prometheus"]["endpoint"])[1]
    assert jobs["otel-collector"] == {f"otel-collector:{collector_port}"}
    for target in set().union(*jobs.values()):
        assert host_port(target)[0] in SERVICES, target
    published = {name: [str(p).split(":")[-1] for p in s.get("ports", [])] for name, s in SERVICES.items()}
    assert str(downstream_port) in published["downstream"] and flower_port in published["flower"]


def test_grafana_prometheus_and_collector_files_are_mounted_where_they_are_read() -> None:
    for service in SERVICES.values():
        for volume in service.get("volumes", []):
            assert (ROOT / volume.split(":")[0]).exists(), volume
    mounts = {v.split(":")[1]: v.split(":")[0] for v in SERVICES["grafana"]["volumes"]}
    for kind in ("datasources", "dashboards"):  # Grafana reads provisioning/<kind>/*.yml
        assert mounts[f"/etc/grafana/provisioning/{kind}"] == f"./deploy/grafana/provisioning/{kind}"
    dashboards_dir = PROVIDERS["providers"][0]["options"]["path"]
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent.as_posix() == dashboards_dir
    assert (ROOT / mounts[dashboards_dir] / Path(home).name).is_file()
    sources = {d["uid"]: d["url"] for d in DATASOURCES["datasources"]}
    assert (
        host_port(sources["prometheus"]) == ("prometheus", 9090)
        and "9090:9090" in SERVICES["prometheus"]["ports"]
    )
    assert host_port(sources["jaeger"])[0] == "jaeger"
    for panel in DASHBOARD["panels"]:
        assert panel["datasource"]["uid"] in sources, panel["title"]
    config = option(SERVICES["otel-collector"]["command"], "--config")
    assert config in [v.split(":")[1] for v in SERVICES["otel-collector"]["volumes"]]
    assert host_port(COLLECTOR["exporters"]["otlp/jaeger"]["endpoint"]) == ("jaeger", 4317)
    prometheus_config = [v.split(":")[1] for v in SERVICES["prometheus"]["volumes"]]
    assert prometheus_config == ["/etc/prometheus/prometheus.yml"]


def _defined_series() -> set[str]:
    """Every sample name the code (resilient_tasks.prometheus) and Flower can export."""
    code = """
import json
from prometheus_client import REGISTRY
from flower.events import get_prometheus_metrics
from resilient_tasks.prometheus import PrometheusMetrics
sink = PrometheusMetrics()
sink.outcome("executed", "t", "d"); sink.breaker_state("d", "open"); sink.fallback_age("t", "d", 1.0)
get_prometheus_metrics()
suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"]}
names = set()
for family in REGISTRY.collect():
    names.update(s.name for s in family.samples)
    names.update(family.name + s for s in suffixes.get(family.type, [""]))
print(json.dumps(sorted(names)))
"""
    return set(json.loads(run([sys.executable, "-c", code], local_env("flower")).stdout))


def test_dashboard_and_prometheus_use_only_series_the_code_or_flower_define() -> None:
    defined = _defined_series()
    for expr in EXPRS:
        used = set(METRIC.findall(expr))
        assert used and used <= defined, f"{expr}: {used - defined} is defined nowhere"
    config_strings = re.findall(r"[\w:.-]+", json.dumps(PROMETHEUS))
    assert {s for s in config_strings if METRIC.fullmatch(s)} <= defined
    joined = "\n".join(EXPRS)
    for wanted in (
        "resilience_breaker_state",
        "sum by (downstream, outcome) (rate(resilience_outcomes_total[1m]))",
        "resilience_fallback_age_seconds",
        "sum by (type) (rate(flower_events_total",
    ):
        assert wanted in joined, f"no panel queries {wanted}"


def test_dashboard_matches_breaker_states_and_event_types() -> None:
    (state,) = [p for p in DASHBOARD["panels"] if "resilience_breaker_state" in p["targets"][0]["expr"]]
    (mapping,) = state["fieldConfig"]["defaults"]["mappings"]
    assert {v["text"]: int(k) for k, v in mapping["options"].items()} == STATE_CODES
    (events,) = [e for e in EXPRS if "task-fallback-served" in e]
    kinds = re.search(r'type=~"([^"]+)"', events)
    assert kinds is not None and set(kinds.group(1).split("|")) == set(EVENTS.values())


def test_dockerfile_installs_what_the_commands_need() -> None:
    installs = [args for kind, args in DOCKERFILE if kind == "RUN" and args[:2] == ["pip", "install"]]
    assert len(installs) == 1
    packages = installs[0][2:]
    (local,) = [p for p in packages if p.startswith(".[")]
    extras = set(local[2:-1].split(","))
    optional = PYPROJECT["project"]["optional-dependencies"]
    assert extras == {"otel", "prometheus"} and extras <= set(optional)
    assert any(
        d.startswith("opentelemetry-instrumentation-celery") for d in optional["otel"]
    )  # workers/otel.py
    assert any(d.startswith("opentelemetry-sdk") for d in optional["otel"])
    assert any(d.startswith("prometheus-client") for d in optional["prometheus"])  # --resilience-metrics-port
    assert any(d.startswith("celery") for d in PYPROJECT["project"]["dependencies"])  # the celery command
    assert any(p.startswith("flower") for p in packages)  # celery ... flower
    assert any(p.startswith("opentelemetry-exporter-otlp") for p in packages)  # grpc exporter for :4317
    copied = {source.rstrip("/") for kind, args in DOCKERFILE if kind == "COPY" for source in args[:-1]}
    assert {"pyproject.toml", PYPROJECT["project"]["readme"], "resilient_tasks"} <= copied
    for service in APP.values():
        for module in modules(service["command"]):
            assert module.split(".")[0] in copied, f"{module} is not copied into the image"
        conf = option(service["command"], "--conf")
        assert conf is None or conf in copied, f"{conf} is not copied into the image"
    assert IMAGE_ENV["PYTHONPATH"] == WORKDIR  # workers/ and examples/ are not installed
    policies = Path(SERVICES["worker-1"]["environment"]["RESILIENT_TASKS_POLICIES"])
    assert policies.is_relative_to(WORKDIR) and (ROOT / policies.relative_to(WORKDIR)).is_file()


# -- the commands, run ------------------------------------------------------------------


class OTLPReceiver(ThreadingHTTPServer):
    """An OTLP/HTTP endpoint on loopback that keeps what it is sent."""

    def __init__(self) -> None:
        self.received: list[tuple[str, bytes]] = []
        super().__init__(("127.0.0.1", 0), _OTLPHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"


class _OTLPHandler(BaseHTTPRequestHandler):
    server: OTLPReceiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.server.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


def scrape(port: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)] from a /metrics endpoint; {} while it is down."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    series: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return series


def total(series: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for found, v in series.get(name, []) if all(found.get(k) == x for k, x in labels.items()))


@contextlib.contextmanager
def started(command: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process group of our own, stopped (TERM, then KILL) on the way out."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield process
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _otel_payloads(
    received: list[tuple[str, bytes]],
) -> tuple[list[tuple[str, str, dict[str, Any]]], set[str]]:
    """(service name, span name, attributes) of every span; names of every metric."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    def values(pairs: Any) -> dict[str, Any]:
        return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in pairs}

    spans, metric_names = [], set()
    for path, body in list(received):
        if path == "/v1/traces":
            traces = ExportTraceServiceRequest.FromString(body)
            for rs in traces.resource_spans:
                service = values(rs.resource.attributes).get("service.name", "")
                spans += [(service, s.name, values(s.attributes)) for ss in rs.scope_spans for s in ss.spans]
        elif path == "/v1/metrics":
            exported = ExportMetricsServiceRequest.FromString(body)
            metric_names |= {
                m.name for rm in exported.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
            }
    return spans, metric_names


def test_compose_commands_serve_every_series_the_dashboard_reads(
    rt_redis_flushed: RedisServer, tmp_path: Path
) -> None:
    ports = {port: str(free_port()) for port in ("8099", "9808", "5555")}
    downstream_url = f"http://127.0.0.1:{ports['8099']}"
    hosts = {
        "redis://redis:6379": rt_redis_flushed.url(0).rsplit("/", 1)[0],
        "http://downstream:8099": downstream_url,
    }
    try:
        exporting = importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is not None
    except ImportError:  # not even the opentelemetry.exporter namespace
        exporting = False
    receiver = OTLPReceiver()
    worker_env = local_env("worker-1", hosts) | {
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prometheus"),
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,  # the compose value names the collector
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "OTEL_METRIC_EXPORT_INTERVAL": "1000",
    }
    logs = {name: tmp_path / f"{name}.log" for name in ("downstream", "worker-1", "flower")}

    def load(*args: str) -> int:
        done = run(
            [sys.executable, "-m", "examples.shop.load", "--rate", "200", "--seed", "7", *args], worker_env
        )
        return int(re.search(r"published (\d+) messages", done.stdout).group(1))  # type: ignore[union-attr]

    def fail(what: str) -> str:
        tails = {name: log.read_text(errors="replace")[-2000:] for name, log in logs.items() if log.exists()}
        return what + "".join(f"\n--- {name}.log\n{text}" for name, text in tails.items())

    def wait(predicate: Any, what: str, timeout: float = 60) -> None:
        try:
            wait_until(predicate, timeout=timeout, interval=0.2, what=what)
        except TimeoutError as exc:  # with the processes' logs as they are now
            raise AssertionError(fail(f"timed out after {timeout}s waiting for {what}")) from exc

    try:
        with contextlib.ExitStack() as stack:
            for name in ("downstream", "worker-1", "flower"):
                env = worker_env if name == "worker-1" else local_env(name, hosts)
                stack.enter_context(started(local_command(SERVICES[name]["command"], ports), env, logs[name]))
            wait(lambda: _answers(f"{downstream_url}/health"), "the downstream", timeout=30)
            downstream.set_failure_rate(downstream_url, 0.0)
            wait(
                lambda: total(scrape(ports["5555"]), "flower_worker_online") >= 1,
                "Flower to see the worker",
                timeout=60,
            )
            sent = load("--orders", "30", "--skus", "3")
            wait(
                lambda: total(scrape(ports["5555"]), "flower_events_total", type="task-succeeded") >= sent,
                f"{sent} task-succeeded events",
                timeout=60,
            )
            downstream.set_failure_rate(downstream_url, 1.0)  # break it: inventory serves last-known stock
            load("--orders", "3", "--skus", "3")  # the same SKUs (same seed), all synced before
            wait(
                lambda: total(scrape(ports["5555"]), "flower_events_total", type="task-fallback-served"),
                "a task-fallback-served event",
                timeout=60,
            )
            wait(
                lambda: total(
                    scrape(ports["9808"]), "resilience_fallback_age_seconds_count", downstream="inventory"
                ),
                "a fallback age on the worker's /metrics",
                timeout=30,
            )
            served = scrape(ports["9808"]) | scrape(ports["5555"])
            assert total(served, "resilience_outcomes_total", outcome="executed", downstream="payments") >= 30
            assert (
                total(served, "resilience_outcomes_total", outcome="fallback_served", downstream="inventory")
                >= 1
            )
            for expr in EXPRS:
                for name in METRIC.findall(expr):
                    assert name in served, fail(f"{name} ({expr}) is not served")
                    labels = set().union(*(found for found, _ in served[name]))
                    for group in re.findall(r"by \(([^)]*)\)", expr):
                        wanted = {g.strip() for g in group.split(",")} - {"le"}
                        assert wanted <= labels, f"{expr}: {name} has no label {wanted - labels}"
            if exporting:
                wait(
                    lambda: any(s[1] == "run/shop.charge" for s in _otel_payloads(receiver.received)[0]),
                    "a run/shop.charge span over OTLP",
                    timeout=30,
                )
                wait(
                    lambda: "resilience.outcomes" in _otel_payloads(receiver.received)[1],
                    "the resilience.outcomes metric over OTLP",
                    timeout=30,
                )
                spans = _otel_payloads(receiver.received)[0]
                charge = next(attrs for service, name, attrs in spans if name == "run/shop.charge")
                assert {service for service, _, _ in spans} == {
                    SERVICES["worker-1"]["environment"]["OTEL_SERVICE_NAME"]
                }
                assert charge["resilience.breaker.name"] == "payments"
            else:  # no exporter: workers/otel.py stays off, and the worker ran all the same
                assert receiver.received == []
    finally:
        receiver.shutdown()
        receiver.server_close()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def test_otel_setup_is_a_no_op_without_an_endpoint_or_an_exporter() -> None:
    env = local_env("worker-1")
    probe = "import workers.app, workers.otel as otel; print(otel.setup())"
    without_endpoint = {k: v for k, v in env.items() if k != "OTEL_EXPORTER_OTLP_ENDPOINT"}
    assert run([sys.executable, "-c", probe], without_endpoint).stdout.strip() == "False"
    # An exporter that is not installed: its package cannot be imported.
    hidden = "import sys; sys.modules['opentelemetry.exporter'] = None\n" + probe
    assert run([sys.executable, "-c", hidden], env).stdout.strip() == "False"
