"""Model cards and Hub uploads: the card renders and re-parses with its eval results; `dsl-push` builds a folder
that loads back offline (model through its remote code, pipeline, card); the upload runs the real huggingface_hub
client code against a local HTTP server that implements the Hub endpoints it calls; a real-Hub round trip runs
only when HF_TOKEN is set."""

import base64
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard

from dsl_diffusion.hub_cards import DEFAULT_TAGS, build_model_card, eval_results_from_sweep, sampler_defaults
from dsl_diffusion.hub_cards.push import upload_to_hub
from dsl_diffusion.modeling_dsl import DSLForMaskedDiffusion
from helpers import tiny_dsl_config, tiny_dsl_model


pytestmark = pytest.mark.usefixtures("single_threaded")  # conftest.py: one thread per library


def sweep_report(checkpoints=("dsl-tiny",)) -> dict:
    """A report shaped as `dsl-evaluate` writes it, with hand-picked numbers."""
    rows = []
    for index, checkpoint in enumerate(checkpoints):
        for sampler, steps, mauve, gen_ppl in (
            ("remdm", 8, 0.41, 55.5),
            ("remdm", 16, 0.52, 40.25),
            ("mdlm", 8, 0.2, 80.0),
        ):
            rows.append(
                {
                    "checkpoint": checkpoint,
                    "sampler": sampler,
                    "num_steps": steps,
                    "nfe": float(steps) - index,
                    "mauve": mauve - 0.1 * index,
                    "mauve_std": 0.01,
                    "frechet_distance": 3.5,
                    "gen_ppl": gen_ppl,
                    "entropy": 4.25,
                    "num_samples": 64,
                    "num_references": 64,
                }
            )
    return {
        "rows": rows,
        "references": {
            "source": "Skylion007/openwebtext",
            "split": "validation",
            "format": "wrapped",
            "num_references": 64,
            "gen_ppl": 14.8,
            "entropy": 5.44,
        },
        "mauve_settings": {
            "featurizer": {
                "name_or_path": "gpt2-large",
                "pooling": "last_token",
                "max_text_length": 1024,
                "effective_max_text_length": 1024,
                "feature_dim": 1280,
            },
            "num_buckets": 6,
            "num_buckets_setting": "auto",
            "seeds": [25, 26],
            "kmeans_explained_var": 0.9,
            "mauve_scaling_factor": 5.0,
            "num_references": 64,
        },
        "judge": {"name_or_path": "gpt2-large", "gguf_file": None, "eos_token_id": 50256},
        "judge_max_length": 1024,
        "generation": {"num_samples": 64, "seq_len": 1024, "batch_size": 1, "seed": 1, "top_p": 0.9},
    }


# ---------------------------------------------------------------------------------------------------------------
# Cards
# ---------------------------------------------------------------------------------------------------------------


def test_card_renders_and_reparses_with_eval_results(tmp_path):
    report = sweep_report(checkpoints=("dsl-tiny", "mdlm-baseline"))
    card = build_model_card(
        "dsl-tiny",
        "someone/dsl-tiny",
        tags=["test"],
        training_details={"learning_rate": 3e-4, "steps": 10_000},
        sweep_report=report,
        sweep_checkpoint="dsl-tiny",
        plot_paths={"mauve": "evaluation/mauve_vs_nfe.png"},
    )
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    data = loaded.data
    assert (data.library_name, data.pipeline_tag, data.license) == ("transformers", "other", "apache-2.0")
    assert data.base_model == "kuleshov-group/mdlm-owt" and data.datasets == ["Skylion007/openwebtext"]
    assert data.tags == [*DEFAULT_TAGS, "test"]
    assert data.model_name == "dsl-tiny"

    # Four metrics per sweep cell of this checkpoint (3 cells), none of the baseline's.
    results = {(r.metric_config, r.metric_type): r for r in data.eval_results}
    assert len(data.eval_results) == 12 and len(results) == 12
    mauve = results[("remdm-T16", "mauve")]
    assert mauve.metric_value == 0.52 and mauve.metric_name == "MAUVE (remdm, T=16)"
    assert mauve.metric_args["featurizer"] == "gpt2-large" and mauve.metric_args["kmeans_seeds"] == [25, 26]
    assert mauve.metric_args["num_samples"] == 64 and mauve.metric_args["nfe"] == 16.0
    assert (mauve.dataset_type, mauve.dataset_name, mauve.dataset_split) == (
        "Skylion007/openwebtext",
        "OpenWebText",
        "validation",
    )
    assert results[("mdlm-T8", "perplexity")].metric_value == 80.0
    assert results[("mdlm-T8", "perplexity")].metric_args["judge"] == "gpt2-large"
    assert results[("remdm-T8", "nfe")].metric_value == 8.0
    assert results[("remdm-T8", "entropy")].metric_value == 4.25

    text = loaded.text
    assert 'AutoModel.from_pretrained("someone/dsl-tiny", trust_remote_code=True' in text
    assert 'pipeline("diffusion-text-generation", model="someone/dsl-tiny", trust_remote_code=True)' in text
    assert "![MAUVE against NFE](evaluation/mauve_vs_nfe.png)" in text
    assert "| dsl-tiny | remdm | 16 | 16.0 | 0.5200 +- 0.0100 |" in text
    assert "| mdlm-baseline | remdm | 16 |" in text  # the comparison rows stay in the table
    assert "featurizer `gpt2-large`" in text and "k-means seeds [25, 26]" in text and "judge `gpt2-large`" in text
    assert "| learning_rate | 0.0003 |" in text
    for sampler in sampler_defaults():
        assert f"| `{sampler}` |" in text


def test_card_without_results_and_bad_checkpoint():
    card = build_model_card("plain", "someone/plain", base_model=None)
    assert card.data.eval_results is None and "No evaluation results" in card.text
    assert "trained from scratch" in card.text
    report = sweep_report(checkpoints=("a", "b"))
    with pytest.raises(ValueError, match="several checkpoints"):
        eval_results_from_sweep(report)
    with pytest.raises(ValueError, match="'c' is not in the sweep report"):
        eval_results_from_sweep(report, "c")


def test_sampler_defaults_come_from_the_sampler_configs():
    defaults = sampler_defaults()
    assert {"mdlm", "remdm", "dsl-sde", "hybrid", "roar"} <= set(defaults)
    from dsl_diffusion.pipelines.samplers import ReMDMConfig

    assert defaults["remdm"]["strategy"] == ReMDMConfig().strategy and defaults["remdm"]["t_on"] == 0.55


# ---------------------------------------------------------------------------------------------------------------
# A local Hub: the endpoints huggingface_hub calls for create_repo + upload_folder
# ---------------------------------------------------------------------------------------------------------------


class LocalHub(ThreadingHTTPServer):
    """An in-process HTTP server speaking the Hub API subset used by `create_repo`, `create_branch` and
    `upload_folder`: repo creation, README metadata validation, preupload (regular vs LFS), the LFS batch API with
    basic transfers and verification, and the ndjson commit endpoint. It keeps every repository's files in memory
    and records every request."""

    daemon_threads = True

    def __init__(self, lfs_suffixes=(".safetensors",)):
        super().__init__(("127.0.0.1", 0), LocalHubHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.lfs_suffixes = lfs_suffixes
        self.repos: dict[str, dict] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[dict] = []
        self.lock = threading.Lock()


class LocalHubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _reply(self, status: int, payload) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        hub: LocalHub = self.server
        body = self._body()
        path = self.path.split("?")[0]
        with hub.lock:
            hub.requests.append(
                {
                    "method": method,
                    "path": path,
                    "headers": {key.lower(): value for key, value in self.headers.items()},
                    "body": body,
                }
            )
        parts = path.strip("/").split("/")
        if method == "POST" and path == "/api/repos/create":
            request = json.loads(body)
            repo_id = f"{request['organization']}/{request['name']}"
            if repo_id in hub.repos:
                return self._reply(
                    409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"}
                )
            hub.repos[repo_id] = {"files": {}, "commits": [], "branches": {"main"}, "private": request.get("private")}
            return self._reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
        if method == "POST" and path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        if method == "POST" and len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
            files = json.loads(body)["files"]
            return self._reply(
                200,
                {
                    "files": [
                        {
                            "path": f["path"],
                            "uploadMode": "lfs" if f["path"].endswith(hub.lfs_suffixes) else "regular",
                            "shouldIgnore": False,
                            "oid": None,
                        }
                        for f in files
                    ]
                },
            )
        if method == "POST" and len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "branch":
            hub.repos[f"{parts[2]}/{parts[3]}"]["branches"].add(parts[5])
            return self._reply(200, {})
        if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            request = json.loads(body)
            return self._reply(
                200,
                {
                    "transfer": "basic",
                    "objects": [
                        {
                            "oid": obj["oid"],
                            "size": obj["size"],
                            "actions": {
                                "upload": {"href": f"{hub.url}/lfs-storage/{obj['oid']}"},
                                "verify": {"href": f"{hub.url}/lfs-storage/{obj['oid']}/verify"},
                            },
                        }
                        for obj in request["objects"]
                    ],
                },
            )
        if method == "PUT" and parts[0] == "lfs-storage":
            if hashlib.sha256(body).hexdigest() != parts[1]:
                return self._reply(400, {"error": "sha256 mismatch"})
            hub.lfs_objects[parts[1]] = body
            return self._reply(200, {})
        if method == "POST" and parts[0] == "lfs-storage" and parts[-1] == "verify":
            oid = json.loads(body)["oid"]
            return self._reply(200 if oid in hub.lfs_objects else 404, {})
        if method == "POST" and len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
            repo = hub.repos.get(f"{parts[2]}/{parts[3]}")
            if repo is None:
                return self._reply(404, {"error": "Repository not found"})
            revision = parts[5]
            if revision not in repo["branches"]:
                return self._reply(404, {"error": f"Revision {revision} not found"})
            lines = [json.loads(line) for line in body.decode().splitlines() if line]
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    repo["files"][(revision, value["path"])] = base64.b64decode(value["content"])
                elif line["key"] == "lfsFile":
                    repo["files"][(revision, value["path"])] = hub.lfs_objects[value["oid"]]
            oid = uuid.uuid4().hex + "00000000"
            repo["commits"].append({"revision": revision, "header": lines[0]["value"], "oid": oid})
            return self._reply(
                200,
                {
                    "commitUrl": f"{hub.url}/{parts[2]}/{parts[3]}/commit/{oid}",
                    "commitOid": oid,
                    "pullRequestUrl": None,
                },
            )
        return self._reply(404, {"error": f"{method} {path} is not implemented by the local hub"})

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")


def allow_http(monkeypatch):
    """`HF_HUB_OFFLINE=1` (set by the Makefile) blocks every request of huggingface_hub, including those to the
    local hub on 127.0.0.1; the upload tests lift it."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@contextlib.contextmanager
def running_local_hub(monkeypatch, lfs_suffixes=(".safetensors",)):
    allow_http(monkeypatch)
    hub = LocalHub(lfs_suffixes)
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        hub.shutdown()
        hub.server_close()


@pytest.fixture
def local_hub(monkeypatch):
    with running_local_hub(monkeypatch) as hub:
        yield hub


@pytest.fixture
def legacy_lfs_upload(monkeypatch):
    """Send LFS files through the LFS batch API (basic transfer) rather than the Xet storage protocol, which a
    local server cannot speak: the client then takes the code path of `huggingface_hub` without `hf_xet`."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)


def small_repo_folder(path: Path) -> Path:
    tiny_dsl_model().save_pretrained(path)
    build_model_card("dsl-tiny", "someone/dsl-tiny", sweep_report=sweep_report()).save(path / "README.md")
    (path / "notes").mkdir()
    (path / "notes" / "sampler_defaults.json").write_text(json.dumps({"sampler": "remdm"}))
    return path


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_upload_to_local_hub(tmp_path, local_hub, legacy_lfs_upload):
    folder = small_repo_folder(tmp_path / "repo")
    commit = upload_to_hub(
        folder, "someone/dsl-tiny", token="hf_local_test_token", endpoint=local_hub.url, commit_message="first upload"
    )
    repo = local_hub.repos["someone/dsl-tiny"]
    expected = local_files(folder)
    assert {path: content for (revision, path), content in repo["files"].items()} == expected
    assert set(expected) >= {"config.json", "model.safetensors", "README.md", "notes/sampler_defaults.json"}
    assert commit.oid == repo["commits"][0]["oid"] and repo["commits"][0]["header"]["summary"] == "first upload"
    # The weights travelled through LFS (batch, PUT of the exact bytes, verify); the rest inline in the commit.
    weights_oid = hashlib.sha256(expected["model.safetensors"]).hexdigest()
    assert local_hub.lfs_objects == {weights_oid: expected["model.safetensors"]}
    calls = [(r["method"], r["path"]) for r in local_hub.requests]
    assert calls[0] == ("POST", "/api/repos/create")
    assert ("POST", "/api/validate-yaml") in calls
    assert ("POST", "/api/models/someone/dsl-tiny/preupload/main") in calls
    assert ("POST", "/someone/dsl-tiny.git/info/lfs/objects/batch") in calls
    assert ("PUT", f"/lfs-storage/{weights_oid}") in calls
    assert calls[-1] == ("POST", "/api/models/someone/dsl-tiny/commit/main")
    assert all(
        r["headers"].get("authorization") == "Bearer hf_local_test_token"
        for r in local_hub.requests
        if r["path"].startswith("/api/")
    )

    # A second push to an existing repo and another branch: create_repo tolerates the 409, the branch is created.
    upload_to_hub(folder, "someone/dsl-tiny", token="hf_local_test_token", endpoint=local_hub.url, revision="v2")
    assert "v2" in repo["branches"] and ("v2", "README.md") in repo["files"]


def test_upload_to_local_hub_through_the_default_client_path(tmp_path, monkeypatch):
    """With `hf_xet` installed (as here) `upload_folder` runs its pipelined uploader; files the server marks as
    regular go inline in the commit, so the whole default path runs against the local hub."""
    with running_local_hub(monkeypatch, lfs_suffixes=()) as hub:
        folder = small_repo_folder(tmp_path / "repo")
        upload_to_hub(folder, "someone/dsl-tiny", token="hf_local_test_token", endpoint=hub.url)
        files = {path: content for (revision, path), content in hub.repos["someone/dsl-tiny"]["files"].items()}
        assert files == local_files(folder)
        assert [r["path"] for r in hub.requests][-1] == "/api/models/someone/dsl-tiny/commit/main"


@pytest.mark.skipif(not os.environ.get("HF_TOKEN"), reason="a real Hub round trip needs HF_TOKEN")
def test_upload_to_the_real_hub(tmp_path, monkeypatch):
    allow_http(monkeypatch)
    api = huggingface_hub.HfApi(token=os.environ["HF_TOKEN"])
    repo_id = f"{api.whoami()['name']}/dsl-diffusion-test-{uuid.uuid4().hex[:8]}"
    folder = small_repo_folder(tmp_path / "repo")
    try:
        upload_to_hub(folder, repo_id, token=os.environ["HF_TOKEN"], private=True)
        assert set(api.list_repo_files(repo_id)) >= set(local_files(folder))
        card = ModelCard.load(repo_id, token=os.environ["HF_TOKEN"])
        assert len(card.data.eval_results) == 12
    finally:
        api.delete_repo(repo_id, missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# dsl-push
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_folder(tmp_path_factory):
    """A tiny random DSL checkpoint with a small trained BPE tokenizer, saved as training would save it."""
    from dsl_diffusion.trainer.tokenization import train_bpe_tokenizer

    documents = [f"Document {i} tells of the {word} by the river." for i in range(40) for word in ("mill", "bridge")]
    tokenizer = train_bpe_tokenizer(documents, vocab_size=300)
    torch.manual_seed(0)
    model = DSLForMaskedDiffusion(
        tiny_dsl_config(
            vocab_size=tokenizer.mask_token_id, mask_token_id=tokenizer.mask_token_id, max_position_embeddings=16
        )
    ).eval()
    folder = tmp_path_factory.mktemp("checkpoint") / "dsl-tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sweep_folder(path: Path) -> Path:
    from dsl_diffusion.evaluation import Curve, plot_metric_vs_nfe

    path.mkdir(parents=True)
    report = sweep_report()
    (path / "sweep_results.json").write_text(json.dumps(report))
    (path / "results.md").write_text("# results\n")
    plot_metric_vs_nfe([Curve("dsl-tiny / remdm", [8, 16], [0.41, 0.52])], path / "mauve_vs_nfe.png", "MAUVE")
    return path


def push_arguments(checkpoint, output_dir, sweep_dir, *extra) -> list[str]:
    training = output_dir.parent / "training.json"
    training.write_text(json.dumps({"learning_rate": 3e-4, "max_steps": 10_000, "snr_path": "lognormal(2.69, 1.41)"}))
    return [
        "--model_path",
        str(checkpoint),
        "--repo_id",
        "someone/dsl-tiny",
        "--output_dir",
        str(output_dir),
        "--sweep_dir",
        str(sweep_dir),
        "--training_details",
        str(training),
        "--default_sampler",
        "dsl-sde",
        "--default_num_steps",
        "4",
        *extra,
    ]


LOAD_BACK_SCRIPT = """
import json, sys, torch
from transformers import AutoModel, AutoTokenizer, pipeline
folder, expected_path = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(folder, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
expected = torch.load(expected_path)
logits = model(input_ids=expected["input_ids"]).logits
pipe = pipeline("diffusion-text-generation", model=folder, trust_remote_code=True)
outputs = pipe(None, num_return_sequences=2, seed=3, return_tensors=True, progress_bar=False)
print(json.dumps({
    "model_module": type(model).__module__,
    "pipeline_module": type(pipe).__module__,
    "logits_match": bool(torch.allclose(logits, expected["logits"], atol=1e-5)),
    "sampler": pipe.model.generation_config.sampler,
    "nfe": [output["nfe"] for output in outputs],
    "lengths": [len(output["generated_token_ids"]) for output in outputs],
    "mask_token_id": tokenizer.mask_token_id,
    "library_imported": any(name.startswith("dsl_diffusion") for name in sys.modules),
}))
"""


def test_push_dry_run_builds_a_folder_that_loads_back_offline(checkpoint_folder, tmp_path):
    from dsl_diffusion.hub_cards.push import main as push_main

    output_dir = tmp_path / "upload"
    assert push_main(push_arguments(checkpoint_folder, output_dir, sweep_folder(tmp_path / "sweep"), "--dry_run")) == 0
    files = set(local_files(output_dir))
    assert {
        "config.json",
        "model.safetensors",
        "configuration_dsl.py",
        "modeling_dsl.py",
        "pipeline_diffusion.py",
        "samplers.py",
        "sampling_utils.py",
        "samplers_discrete.py",
        "samplers_continuous.py",
        "samplers_hybrid.py",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_dsl.py",
        "generation_config.json",
        "README.md",
        "evaluation/sweep_results.json",
        "evaluation/results.md",
        "evaluation/mauve_vs_nfe.png",
    } <= files
    config = json.loads((output_dir / "config.json").read_text())
    assert "AutoModel" in config["auto_map"] and "diffusion-text-generation" in config["custom_pipelines"]
    generation = json.loads((output_dir / "generation_config.json").read_text())
    assert generation["sampler"] == "dsl-sde" and generation["num_steps"] == 4

    card = ModelCard.load(output_dir / "README.md")
    assert len(card.data.eval_results) == 12 and card.data.eval_results[0].metric_type == "mauve"
    assert 'sampler="dsl-sde",\n    num_steps=4,' in card.text
    assert (
        "| learning_rate | 0.0003 |" in card.text and "![MAUVE against NFE](evaluation/mauve_vs_nfe.png)" in card.text
    )
    assert "parameters." in card.text and "vocabulary 300 (+ [MASK])" in card.text

    # Load everything back in a fresh interpreter, offline, through the remote code only (no dsl_diffusion import).
    model = DSLForMaskedDiffusion.from_pretrained(checkpoint_folder).eval()
    input_ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.save(
        {"input_ids": input_ids, "logits": model(input_ids=input_ids).logits.detach()}, tmp_path / "expected.pt"
    )
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "OMP_NUM_THREADS": "1",
    }
    completed = subprocess.run(
        [sys.executable, "-c", LOAD_BACK_SCRIPT, str(output_dir), str(tmp_path / "expected.pt")],
        capture_output=True,
        text=True,
        env=environment,
        cwd=tmp_path,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    loaded = json.loads(completed.stdout.strip().splitlines()[-1])
    assert loaded["model_module"].startswith("transformers_modules") and loaded["logits_match"]
    assert loaded["pipeline_module"].startswith("transformers_modules") and loaded["sampler"] == "dsl-sde"
    assert loaded["nfe"] == [5, 5] and loaded["lengths"] == [16, 16] and loaded["mask_token_id"] == 300
    assert not loaded["library_imported"]

    with pytest.raises(FileExistsError, match="not empty"):
        push_main(push_arguments(checkpoint_folder, output_dir, tmp_path / "sweep", "--dry_run"))


def test_push_uploads_the_folder_to_a_local_hub(checkpoint_folder, tmp_path, local_hub, legacy_lfs_upload):
    from dsl_diffusion.hub_cards.push import main as push_main

    output_dir = tmp_path / "upload"
    arguments = push_arguments(
        checkpoint_folder,
        output_dir,
        sweep_folder(tmp_path / "sweep"),
        "--endpoint",
        local_hub.url,
        "--token",
        "hf_local_test_token",
    )
    assert push_main(arguments) == 0
    uploaded = {path: content for (revision, path), content in local_hub.repos["someone/dsl-tiny"]["files"].items()}
    assert uploaded == local_files(output_dir)
    card = ModelCard(uploaded["README.md"].decode())
    assert len(card.data.eval_results) == 12


def test_finetune_push_to_hub_uploads_what_dsl_push_builds(checkpoint_folder, tmp_path, local_hub, legacy_lfs_upload, monkeypatch):
    """`dsl-finetune --push_to_hub` (here the merged-LoRA export, which the Trainer's own push skipped) and `dsl-push`
    on the saved model produce the same repository contents."""
    from dsl_diffusion.hub_cards.push import main as push_main
    from dsl_diffusion.trainer.finetune import run

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", local_hub.url)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Document {i} tells of the mill by the river."}) + "\n" for i in range(40)))
    output_dir = tmp_path / "finetuned"
    run([
        "--model_name_or_path", str(checkpoint_folder), "--dataset", str(corpus), "--block_size", "16",
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--lora_r", "2", "--output_dir", str(output_dir),
        "--use_cpu", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
        "--push_to_hub", "--hub_model_id", "someone/dsl-finetuned", "--hub_token", "hf_local_test_token",
    ])  # fmt: skip
    uploaded = {path: content for (_, path), content in local_hub.repos["someone/dsl-finetuned"]["files"].items()}
    dry_run = tmp_path / "dsl-push"
    assert push_main(["--model_path", str(output_dir), "--repo_id", "someone/dsl-finetuned", "--output_dir", str(dry_run), "--dry_run"]) == 0
    assert uploaded == local_files(dry_run)
    assert {"model.safetensors", "generation_config.json", "pipeline_diffusion.py", "samplers.py", "sampling_utils.py", "samplers_discrete.py", "samplers_continuous.py", "samplers_hybrid.py", "README.md"} <= set(uploaded)
    assert b"global_step" in uploaded["README.md"]  # the training record of dsl-finetune is in the card
