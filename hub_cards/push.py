"""``dsl-push``: assemble a DSL checkpoint's Hub repository in one folder and upload it with ``huggingface_hub``.

The folder holds everything a user needs with nothing but ``transformers`` installed:

- the model (``config.json``, ``model.safetensors``) and its modeling code as remote code (``auto_map``), written by
  ``save_pretrained`` of the registered DSL classes;
- the tokenizer (with its ``[MASK]`` token);
- the generation defaults (``generation_config.json``: the sampler and its knobs) and the
  ``diffusion-text-generation`` pipeline as remote code (``custom_pipelines`` in ``config.json``), written by the
  pipeline's own ``save_pretrained``;
- ``README.md``: the model card (:func:`~dsl_diffusion.hub_cards.card.build_model_card`), with the sweep's results as
  ``model-index`` eval results when a ``dsl-evaluate`` output folder is given, and ``evaluation/`` with the sweep's
  ``sweep_results.json``, ``results.md`` and plots.

Then ``HfApi.create_repo(exist_ok=True)`` and ``HfApi.upload_folder`` push it in one commit; ``--dry_run`` stops
after the folder. ``--endpoint`` (or ``HF_ENDPOINT``) selects another Hub, e.g. a mirror or a test server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import HfApi
from transformers import AutoModel, HfArgumentParser

from ..modeling_dsl.generation_dsl import DSLGenerationConfig
from .card import PIPELINE_TASK, build_model_card


logger = logging.getLogger(__name__)

__all__ = ["PushArguments", "prepare_upload_folder", "upload_to_hub", "main"]

EVALUATION_FOLDER = "evaluation"
SWEEP_FILES = ("sweep_results.json", "results.md")
TRAINING_RECORD = "dsl_training.json"  # written by dsl-finetune next to the final model
SWEEP_PLOTS = {"mauve": "mauve_vs_nfe.png", "gen_ppl": "gen_ppl_vs_nfe.png"}


@dataclass
class PushArguments:
    """Arguments of ``dsl-push``."""

    model_path: str = field(metadata={"help": "The checkpoint to publish: a local folder (or a Hub id)."})
    repo_id: str = field(metadata={"help": "Target Hub repository, `namespace/name`."})
    output_dir: str = field(default="outputs/hub_upload", metadata={"help": "Where the repository folder is built."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer (default: the checkpoint's)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow remote code when loading model_path."})
    sweep_dir: str | None = field(default=None, metadata={"help": "A `dsl-evaluate` output folder to attach."})
    sweep_checkpoint: str | None = field(
        default=None, metadata={"help": "Label of this checkpoint in the sweep (needed if it has several)."}
    )
    training_details: str | None = field(
        default=None,
        metadata={"help": "A JSON file of training settings shown in the card (default: the model folder's "
                  "dsl_training.json, which dsl-finetune writes)."},
    )
    model_name: str | None = field(default=None, metadata={"help": "Name in the card (default: the repo name)."})
    base_model: str | None = field(default="kuleshov-group/mdlm-owt", metadata={"help": "Model it was tuned from."})
    datasets: list[str] = field(default_factory=lambda: ["Skylion007/openwebtext"], metadata={"help": "Datasets."})
    license: str = field(default="apache-2.0", metadata={"help": "License identifier of the Hub."})
    tags: list[str] = field(default_factory=list, metadata={"help": "Extra tags."})
    default_sampler: str | None = field(
        default=None, metadata={"help": "Default sampler of the pipeline (default: the model's, else published)."}
    )
    default_num_steps: int | None = field(default=None, metadata={"help": "Default step budget of the pipeline."})
    private: bool = field(default=False, metadata={"help": "Create the repository as private."})
    revision: str | None = field(default=None, metadata={"help": "Branch to commit to (default: main)."})
    commit_message: str = field(default="Upload DSL model with dsl-push", metadata={"help": "Commit message."})
    endpoint: str | None = field(default=None, metadata={"help": "Hub endpoint (default: HF_ENDPOINT or the Hub)."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: HF_TOKEN or the saved login)."})
    dry_run: bool = field(default=False, metadata={"help": "Build the folder and stop: upload nothing."})

    def __post_init__(self):
        if self.repo_id.count("/") != 1 or not all(self.repo_id.split("/")):
            raise ValueError(f"repo_id must look like `namespace/name`, got {self.repo_id!r}")


def _load_sweep(sweep_dir: str) -> dict:
    path = Path(sweep_dir) / "sweep_results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{sweep_dir} has no sweep_results.json: pass the --output_dir of a dsl-evaluate run")
    return _read_json_object(path, "a dsl-evaluate sweep report")


def _read_json_object(path: str | Path, what: str) -> dict:
    """A JSON object read from ``path``, or an error naming the file and what it should hold."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: it should be {what} (a JSON file).")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): it should be {what}.") from err
    if not isinstance(content, dict):
        raise ValueError(f"{path} must hold a JSON object ({what}), got {type(content).__name__}.")
    return content


@contextlib.contextmanager
def _atomic_folder(folder: Path):
    """Yield a fresh staging folder beside ``folder``; it becomes ``folder`` only if the block succeeds, so that
    an error never leaves a half-built folder (and a corrected retry finds ``folder`` still free)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp creates it owner-only
        if folder.exists():
            folder.rmdir()  # checked empty before the build: os.replace needs the name free or an empty folder
        staging.replace(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def prepare_upload_folder(args: PushArguments) -> Path:
    """Build the repository folder (model, tokenizer, remote code, pipeline, defaults, card, evaluation files), all
    inputs checked first and the folder appearing only when complete."""
    from ..modeling_dsl.modeling_dsl import check_checkpoint_files

    target = Path(args.output_dir)
    if target.is_file() or (target.is_dir() and any(target.iterdir())):
        raise FileExistsError(f"{target} is not empty: give an empty or new --output_dir for the repository folder")
    # Every input is checked before the (slow) build starts.
    check_checkpoint_files(args.model_path)
    sweep_report = _load_sweep(args.sweep_dir) if args.sweep_dir is not None else None
    training_record = Path(args.model_path) / TRAINING_RECORD
    if args.training_details is None and training_record.is_file():
        args.training_details = str(training_record)  # what dsl-finetune recorded about this model
    training_details = (
        _read_json_object(args.training_details, "a JSON object of training settings")
        if args.training_details is not None
        else None
    )
    with _atomic_folder(target) as folder:
        _build_upload_folder(args, folder, sweep_report, training_details)
    return target


def _build_upload_folder(args: PushArguments, folder: Path, sweep_report: dict | None, training_details: dict | None):
    import transformers

    from .. import pipelines  # noqa: F401  (registers the DSL model classes and the pipeline task)
    from ..trainer.tokenization import load_tokenizer

    model = AutoModel.from_pretrained(args.model_path, trust_remote_code=args.trust_remote_code, dtype=torch.float32)
    tokenizer = load_tokenizer(args.tokenizer or args.model_path)
    # The model's own generation defaults when its folder has any, else the published ones; then the requested
    # changes. A model without a generation_config.json holds only its special-token ids.
    generation_config = model.generation_config
    if generation_config.sampler is None:
        special = {name: getattr(generation_config, name) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
        generation_config = DSLGenerationConfig.published_defaults()
        generation_config.update(**{name: value for name, value in special.items() if value is not None})
    overrides = {"sampler": args.default_sampler, "num_steps": args.default_num_steps}
    generation_config.update(**{key: value for key, value in overrides.items() if value is not None})
    model.generation_config = generation_config
    pipe = transformers.pipeline(PIPELINE_TASK, model=model, tokenizer=tokenizer, device="cpu")
    # The pipeline saves the model (with its remote code and generation_config.json), the tokenizer and its own
    # code as a custom pipeline.
    pipe.save_pretrained(folder)

    plot_paths = {}
    if args.sweep_dir is not None:
        (folder / EVALUATION_FOLDER).mkdir()
        for name in (*SWEEP_FILES, *SWEEP_PLOTS.values()):
            source = Path(args.sweep_dir) / name
            if source.is_file():
                shutil.copy2(source, folder / EVALUATION_FOLDER / name)
        plot_paths = {
            metric: f"{EVALUATION_FOLDER}/{name}"
            for metric, name in SWEEP_PLOTS.items()
            if (folder / EVALUATION_FOLDER / name).is_file()
        }

    config = model.config
    card = build_model_card(
        model_name=args.model_name or args.repo_id.split("/")[1],
        repo_id=args.repo_id,
        base_model=args.base_model,
        datasets=args.datasets,
        license=args.license,
        tags=args.tags,
        architecture=(
            f"DiT, {config.num_hidden_layers} blocks, hidden size {config.hidden_size}, "
            f"{config.num_attention_heads} heads, {config.max_position_embeddings} positions, vocabulary "
            f"{config.vocab_size} (+ [MASK]), token directions of dimension {config.embed_dim}, "
            f"snr_max {config.snr_max}; {model.num_parameters():,} parameters."
        ),
        generation_config=generation_config.to_diff_dict(),
        training_details=training_details,
        sweep_report=sweep_report,
        sweep_checkpoint=args.sweep_checkpoint,
        plot_paths=plot_paths,
        sweep_results_file=f"{EVALUATION_FOLDER}/sweep_results.json",
    )
    card.save(folder / "README.md")


def upload_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | bool | None = None,
    endpoint: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload DSL model with dsl-push",
):
    """Create ``repo_id`` if needed and upload ``folder`` in one commit; returns the ``CommitInfo``."""
    api = HfApi(endpoint=endpoint, token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), revision=revision, commit_message=commit_message
    )
    logger.info("Uploaded %s to %s (commit %s)", folder, repo_url, commit.oid)
    return commit


def main(argv: list[str] | None = None) -> int:
    """``dsl-push``: build the repository folder of a DSL checkpoint and upload it (see ``dsl-push --help``)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (args,) = HfArgumentParser(PushArguments).parse_args_into_dataclasses(args=argv)
    folder = prepare_upload_folder(args)
    if args.dry_run:
        print(f"Dry run: the repository folder is ready at {folder}; nothing was uploaded.")
        return 0
    commit = upload_to_hub(
        folder,
        args.repo_id,
        token=args.token,
        endpoint=args.endpoint,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
    )
    print(f"Uploaded {folder} to {args.repo_id}: {commit.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
