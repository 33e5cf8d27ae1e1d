"""Adapter registry against a real MLflow server (conftest's session `mlflow_server`)."""

from __future__ import annotations

import socket
import time
import uuid

import pytest

from adapters_hub import registry as reg_mod
from adapters_hub.registry import (
    MANIFEST,
    AdapterNotFoundError,
    ChecksumError,
    Registry,
    RegistryError,
    RegistryUnavailableError,
)


@pytest.fixture
def reg(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("LISA_HUB_HOME", str(tmp_path / "home"))  # a fresh download cache per test
    return Registry(mlflow_server)


@pytest.fixture
def task():
    return f"t{uuid.uuid4().hex[:10]}"  # the server lives for the session: names must not collide


def _adapter_dir(path, seed: str):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(f'{{"kind": "lisa", "seed": "{seed}"}}')
    (path / "adapter_model.safetensors").write_bytes(seed.encode() * 100)
    (path / "sub").mkdir()
    (path / "sub" / "notes.txt").write_text("nested files are covered too")
    return path


def _run(reg: Registry) -> str:
    client = reg.client()
    exp = client.get_experiment_by_name("registry-tests")
    exp_id = exp.experiment_id if exp else client.create_experiment("registry-tests")
    return client.create_run(exp_id).info.run_id


def _register(reg, tmp_path, task, value, *, kind="lisa", metric="accuracy", higher=True, seed=None,
              nll=1.5, tie_breaker=None):
    seed = seed or uuid.uuid4().hex
    return reg.register_adapter(
        run_id=_run(reg), adapter_dir=_adapter_dir(tmp_path / seed, seed), task=task, kind=kind,
        base="tiny-llama", base_fingerprint="abc123", plan_hash="plan42",
        metrics={metric: value, "answer_nll": nll}, main_metric=metric, higher_is_better=higher,
        trainable_params=1234, tie_breaker=tie_breaker)


@pytest.mark.stack
def test_a_tie_on_the_main_metric_goes_to_the_tie_breaker(reg, tmp_path, task):
    nll = ("answer_nll", False)  # lower is better
    assert "champion" in _register(reg, tmp_path, task, 0.0, nll=2.2, tie_breaker=nll).aliases
    assert _register(reg, tmp_path, task, 0.0, nll=2.5, tie_breaker=nll).aliases == ("candidate",)
    assert _register(reg, tmp_path, task, 0.0, nll=2.0, tie_breaker=nll).aliases == ("candidate", "champion")
    assert _register(reg, tmp_path, task, 0.0, nll=2.0, tie_breaker=nll).aliases == ("candidate",)  # full tie
    # the main metric still comes first: better accuracy wins with a worse NLL
    assert _register(reg, tmp_path, task, 0.1, nll=3.0, tie_breaker=nll).aliases == ("candidate", "champion")
    assert reg.get_adapter(f"{task}-lisa@champion").version == 5
    with pytest.raises(ValueError, match="tie_breaker 'ppl' is not among the metrics"):
        _register(reg, tmp_path, task, 0.2, tie_breaker=("ppl", False))
    assert [r.version for r in reg.list_adapters(task)] == [1, 2, 3, 4, 5]  # nothing registered


@pytest.mark.stack
def test_champion_goes_to_the_better_version_only(reg, tmp_path, task):
    name = f"{task}-lisa"
    first = _register(reg, tmp_path, task, 0.30)
    assert (first.name, first.version, first.aliases) == (name, 1, ("candidate", "champion"))
    worse = _register(reg, tmp_path, task, 0.20)
    assert worse.aliases == ("candidate",)
    tie = _register(reg, tmp_path, task, 0.30)  # a tie does not beat the champion
    assert tie.aliases == ("candidate",)
    better = _register(reg, tmp_path, task, 0.50)
    assert better.version == 4 and better.aliases == ("candidate", "champion")

    records = reg.list_adapters(task)
    assert [(r.version, r.aliases) for r in records] == [(1, ()), (2, ()), (3, ()), (4, ("candidate", "champion"))]
    champion = reg.get_adapter(name)  # a bare name means the champion
    assert champion.version == 4 and champion.metrics == {"accuracy": 0.5, "answer_nll": 1.5}
    tags = champion.tags
    assert {k: tags[k] for k in ("task", "kind", "base_model", "base_fingerprint", "plan_hash", "trainable_params")} == {
        "task": task, "kind": "lisa", "base_model": "tiny-llama", "base_fingerprint": "abc123",
        "plan_hash": "plan42", "trainable_params": "1234"}
    assert len(tags["sha256"]) == 64 and tags["metric.accuracy"] == "0.5"
    assert reg.client().get_registered_model(name).description.startswith("lisa-hub lisa adapters")

    # lower is better (perplexity): the champion follows the lower value
    _register(reg, tmp_path, task, 12.0, kind="drop", metric="perplexity", higher=False)
    assert _register(reg, tmp_path, task, 9.0, kind="drop", metric="perplexity", higher=False).aliases == (
        "candidate", "champion")
    assert _register(reg, tmp_path, task, 10.0, kind="drop", metric="perplexity", higher=False).aliases == (
        "candidate",)
    assert {r.name for r in reg.list_adapters(task)} == {name, f"{task}-drop"}

    # manual promotion (e.g. a rollback)
    assert reg.promote(name, 1, "champion").aliases == ("champion",)
    assert reg.get_adapter(f"{name}@champion").version == 1


@pytest.mark.stack
def test_resolve_returns_a_verified_copy_and_heals_the_cache(reg, tmp_path, task, monkeypatch):
    done = _register(reg, tmp_path, task, 0.4, seed="weights-v1")
    path = reg.resolve(f"{done.name}@champion")
    source = tmp_path / "weights-v1"
    for rel in ("adapter_config.json", "adapter_model.safetensors", "sub/notes.txt"):
        assert (path / rel).read_bytes() == (source / rel).read_bytes()
    assert (path.parents[1] / MANIFEST).is_file() and (path.parents[1] / "MLmodel").is_file()  # an MLflow model
    assert reg.resolve(f"{done.name}/1") == path == reg.resolve(done.name)

    # a cache hit does not download
    client = reg.client()
    monkeypatch.setattr(client, "download_artifacts", lambda *a, **k: pytest.fail("downloaded although cached"))
    reg.resolve(done.name)
    monkeypatch.undo()
    monkeypatch.setenv("LISA_HUB_HOME", str(tmp_path / "home"))

    # a corrupted cache is detected and downloaded again
    (path / "adapter_model.safetensors").write_bytes(b"bit rot")
    healed = reg.resolve(done.name)
    assert (healed / "adapter_model.safetensors").read_bytes() == (source / "adapter_model.safetensors").read_bytes()


@pytest.mark.stack
def test_racing_resolves_of_one_version_all_return_the_verified_copy(reg, tmp_path, task, monkeypatch):
    """Two jobs on one node resolving the same backbone at once (CI saw ENOTEMPTY here)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    done = _register(reg, tmp_path, task, 0.4, seed="weights-race")
    monkeypatch.setenv("LISA_HUB_HOME", str(tmp_path / "race-home"))
    barrier = threading.Barrier(3)
    downloaded = threading.Barrier(3)

    def one(_):
        own = Registry(reg.tracking_uri)
        client = own.client()
        real = client.download_artifacts

        def in_step(*a, **k):  # every thread downloads before any moves its copy into the cache
            local = real(*a, **k)
            downloaded.wait()
            return local

        client.download_artifacts = in_step
        barrier.wait()
        return own.resolve(done.name)

    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(one, range(3)))
    assert len(set(paths)) == 1
    source = tmp_path / "weights-race"
    assert (paths[0] / "adapter_model.safetensors").read_bytes() == (source / "adapter_model.safetensors").read_bytes()


@pytest.mark.stack
def test_corrupted_download_is_an_error(reg, tmp_path, task, monkeypatch):
    done = _register(reg, tmp_path, task, 0.4)
    client = reg.client()
    real = client.download_artifacts

    def corrupting(run_id, path, dst_path=None):
        local = real(run_id, path, dst_path=dst_path)
        with open(f"{local}/artifacts/adapter/adapter_model.safetensors", "ab") as fh:
            fh.write(b"tampered")
        return local

    monkeypatch.setattr(client, "download_artifacts", corrupting)
    with pytest.raises(ChecksumError, match=r"fail verification.*changed: \['artifacts/adapter/adapter_model.safetensors'\]"):
        reg.resolve(done.name)
    assert not any((tmp_path / "home" / "cache" / "adapters" / done.name).glob("1*"))  # nothing cached


@pytest.mark.stack
def test_failed_registration_leaves_nothing_behind(reg, tmp_path, task, monkeypatch):
    name = f"{task}-lisa"
    client = reg.client()
    # 1. missing adapter folder: fails before the registry is touched
    with pytest.raises(FileNotFoundError, match="does not exist"):
        reg.register_adapter(run_id=_run(reg), adapter_dir=tmp_path / "missing", task=task, kind="lisa",
                             base="tiny-llama", base_fingerprint="f", plan_hash="p", metrics={"accuracy": 0.1},
                             main_metric="accuracy", higher_is_better=True, trainable_params=1)
    assert not [m for m in client.search_registered_models() if m.name == name]

    # 2. failure after the version exists, on a new registered model: the model goes too
    real_alias = client.set_registered_model_alias

    def failing(model, alias, version):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(client, "set_registered_model_alias", failing)
    with pytest.raises(RegistryError, match="rolled back.*injected failure"):
        _register(reg, tmp_path, task, 0.1)
    assert not [m for m in client.search_registered_models() if m.name == name]
    monkeypatch.undo()
    monkeypatch.setenv("LISA_HUB_HOME", str(tmp_path / "home"))

    # 3. failure while moving `champion` onto a better version: the version is deleted and
    #    both aliases point where they pointed before
    _register(reg, tmp_path, task, 0.2)                 # v1 champion
    _register(reg, tmp_path, task, 0.1)                 # v2 candidate

    def failing_champion(model, alias, version):
        if alias == "champion" and version == "3":
            raise RuntimeError("injected failure")
        return real_alias(model, alias, version)

    monkeypatch.setattr(client, "set_registered_model_alias", failing_champion)
    with pytest.raises(RegistryError, match="injected failure"):
        _register(reg, tmp_path, task, 0.9)
    assert [r.version for r in reg.list_adapters(task)] == [1, 2]
    assert client.get_registered_model(name).aliases == {"champion": "1", "candidate": "2"}


@pytest.mark.stack
def test_unknown_refs_list_what_exists(reg, tmp_path, task):
    done = _register(reg, tmp_path, task, 0.4)
    with pytest.raises(AdapterNotFoundError, match=rf"no registered model 'nope-lisa'.*known: .*{done.name}"):
        reg.resolve("nope-lisa@champion")
    with pytest.raises(AdapterNotFoundError, match=r"no alias 'staging'; aliases: candidate -> 1, champion -> 1"):
        reg.resolve(f"{done.name}@staging")
    with pytest.raises(AdapterNotFoundError, match=r"no version 7; versions: 1"):
        reg.get_adapter(f"{done.name}/7")
    with pytest.raises(AdapterNotFoundError, match="no version 9"):
        reg.promote(done.name, 9, "champion")
    with pytest.raises(ValueError, match="expected NAME"):
        reg.resolve("../../etc@champion")


@pytest.mark.stack
def test_backbone_plan_is_shared_per_base(reg, tmp_path):
    base = f"org/Model {uuid.uuid4().hex[:6]}"
    assert reg.get_backbone(base) is None
    plan = tmp_path / "plan"
    plan.mkdir()
    (plan / "plan.json").write_text('{"layers": [3, 4]}')
    (plan / "report.md").write_text("# analysis")
    done = reg.register_backbone(base, plan, plan_hash="h1", base_fingerprint="fp")
    assert done.name.startswith("backbone-org-Model-") and done.aliases == ("champion",)
    folder = reg.get_backbone(base)
    assert (folder / "plan.json").read_text() == '{"layers": [3, 4]}' and (folder / "report.md").is_file()
    assert reg.get_adapter(done.name).tags["plan_hash"] == "h1"
    assert done.name not in {r.name for r in reg.list_adapters()}  # backbones are not adapters

    with pytest.raises(reg_mod.PlanExistsError, match="already has a champion plan"):
        reg.register_backbone(base, plan)
    (plan / "plan.json").write_text('{"layers": [5]}')
    assert reg.register_backbone(base, plan, replace=True).version == 2
    assert (reg.get_backbone(base) / "plan.json").read_text() == '{"layers": [5]}'


def test_backbone_names_are_mlflow_safe_and_distinct():
    assert reg_mod.backbone_model_name("smollm2-135m") == "backbone-smollm2-135m"
    a, b = reg_mod.backbone_model_name("org/model"), reg_mod.backbone_model_name("org-model")
    assert a != b and a.startswith("backbone-org-model-") and "/" not in a


def test_unreachable_mlflow_fails_fast_and_clearly():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    with pytest.raises(RegistryUnavailableError, match=rf"{uri} is unreachable.*lisa-hub up"):
        Registry(uri).list_adapters()
    assert time.monotonic() - start < 5


@pytest.mark.stack
def test_analyze_cli_registers_the_backbone_jobs_use(mlflow_server, tiny, tmp_path, monkeypatch, capsys):
    from adapters_hub import backbone
    from sdk import cli
    from adapters_hub.lisa.plan import SharingPlan

    monkeypatch.setenv("LISA_HUB_HOME", str(tmp_path / "home"))
    base = tmp_path / "my-base"  # a local folder is a base name of its own: no clash with other tests
    tiny[0].save_pretrained(base)
    tiny[1].save_pretrained(base)
    out = tmp_path / "analysis"
    args = ["analyze", "--base", str(base), "--out", str(out), "--blocks", "2", "--block-len", "32",
            "--skip-tokens", "0", "--register"]
    assert cli.main(args) == 0
    written = SharingPlan.load(out / "plan.json")
    assert backbone.backbone_plan(str(base), create=False, tracking_uri=mlflow_server).hash == written.hash
    assert cli.main(args) == 2  # a second plan for the same base needs --replace
    assert "already has a champion plan" in capsys.readouterr().err
    assert cli.main(args + ["--replace"]) == 0


@pytest.mark.parametrize("new,champion,expect", [
    ({"acc": 0.5, "nll": 2.0}, {"acc": 0.4, "nll": 1.0}, True),    # main metric higher: wins
    ({"acc": 0.3, "nll": 1.0}, {"acc": 0.4, "nll": 2.0}, False),   # main metric lower: loses
    ({"acc": 0.4, "nll": 1.5}, {"acc": 0.4, "nll": 2.0}, True),    # tie, tie-breaker lower NLL: wins
    ({"acc": 0.4, "nll": 2.5}, {"acc": 0.4, "nll": 2.0}, False),   # tie, tie-breaker worse: loses
    ({"acc": 0.4, "nll": 2.0}, {"acc": 0.4, "nll": 2.0}, False),   # full tie keeps the champion
    ({"acc": 0.1, "nll": 9.0}, {"nll": 1.0}, True),                # champion lacks the main metric: loses
    ({"acc": 0.4, "nll": 9.0}, {"acc": 0.4}, False),               # ... lacks the tie-breaker: stays
    ({"acc": 0.4, "nll": 2.0 - 6e-7}, {"acc": 0.4, "nll": 2.0}, False),  # within TOLERANCE: a tie
    ({"acc": 0.4, "nll": 2.0 - 1e-4}, {"acc": 0.4, "nll": 2.0}, True),   # beyond it: better
])
def test_champion_policy_table(new, champion, expect):
    from adapters_hub.registry import beats

    tags = {f"metric.{k}": repr(float(v)) for k, v in champion.items()}
    assert beats(new, tags, [("acc", True), ("nll", False)]) is expect


def _tags(**metrics):
    return {f"metric.{k}": repr(float(v)) for k, v in metrics.items()}


@pytest.mark.parametrize("champion,contenders,expect", [
    (None, [], None),
    (None, [(1, _tags(acc=0.3)), (2, _tags(acc=0.4)), (3, _tags(acc=0.2))], 2),      # best of all
    ((1, _tags(acc=0.3)), [(2, _tags(acc=0.3)), (3, _tags(acc=0.1))], 1),             # ties keep the champion
    ((1, _tags(acc=0.3)), [(3, _tags(acc=0.5)), (2, _tags(acc=0.5))], 2),             # version order: first to beat
    ((1, _tags(acc=0.3)), [(2, _tags(nll=0.1)), (3, _tags(acc=0.35))], 3),            # lacking the metric: no contender
    ((4, _tags(acc=0.1)), [(5, _tags(acc=0.1, nll=0.5))], 4),                         # same order wherever computed
])
def test_champion_is_a_function_of_the_versions(champion, contenders, expect):
    from adapters_hub.registry import pick_champion

    assert pick_champion(champion, contenders, [("acc", True)]) == expect
    assert pick_champion(champion, list(reversed(contenders)), [("acc", True)]) == expect  # order of listing


@pytest.mark.stack
def test_concurrent_registrations_keep_every_version_and_the_best_champion(reg, tmp_path, task):
    """4 threads with their own clients register at once on a new registered model (the
    raw MLflow calls race on 'create model', version numbers and the champion alias)."""
    from concurrent.futures import ThreadPoolExecutor

    values = [0.1, 0.4, 0.2, 0.3]
    barrier = __import__("threading").Barrier(len(values))

    def one(value):
        own = Registry(reg.tracking_uri)
        own.client()
        barrier.wait()
        return _register(own, tmp_path, task, value)

    with ThreadPoolExecutor(len(values)) as pool:
        done = list(pool.map(one, values))
    name = f"{task}-lisa"
    records = {r.version: r for r in reg.list_adapters(task)}
    assert sorted(records) == [1, 2, 3, 4] and sorted(d.version for d in done) == [1, 2, 3, 4]
    champion = reg.get_adapter(f"{name}@champion")
    assert champion.metrics["accuracy"] == 0.4
    assert {d.version: d for d in done}[champion.version].aliases[-1] == "champion"

    # a manual promotion (rollback) is kept until a later registration beats it
    reg.promote(name, [v for v, r in records.items() if r.metrics["accuracy"] == 0.1][0])
    assert _register(reg, tmp_path, task, 0.05).aliases == ("candidate",)
    assert reg.get_adapter(name).metrics["accuracy"] == 0.1
    assert "champion" in _register(reg, tmp_path, task, 0.15).aliases


@pytest.mark.stack
def test_racing_plan_registrations_leave_one_plan(reg, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from adapters_hub.registry import PlanExistsError

    base = f"race-{uuid.uuid4().hex[:6]}"
    barrier = __import__("threading").Barrier(3)

    def one(i):
        plan = tmp_path / f"plan{i}"
        plan.mkdir()
        (plan / "plan.json").write_text(f'{{"layers": [{i}]}}')
        own = Registry(reg.tracking_uri)
        own.client()
        barrier.wait()
        try:
            return own.register_backbone(base, plan).version
        except PlanExistsError:
            return None

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(one, range(3)))
    assert sorted(results, key=str) == [1, None, None]
    assert [mv.version for mv in reg.client().search_model_versions(f"name = '{reg_mod.backbone_model_name(base)}'")] == ["1"]


@pytest.mark.stack
def test_a_hybrid_plan_round_trips_through_the_registry(reg, tmp_path):
    from adapters_hub.lisa import SharingPlan

    plan = SharingPlan.explicit(num_layers=6, num_heads=4, head_dim=16, layers=[2, 4], dropped=[3])
    plan.save(tmp_path / "bb" / "plan.json")
    base = f"hybrid-{uuid.uuid4().hex[:6]}"
    reg.register_backbone(base, tmp_path / "bb", plan_hash=plan.hash)
    got = SharingPlan.load(reg.get_backbone(base) / "plan.json")
    assert got == plan and got.hash == plan.hash and got.dropped == (3,)
