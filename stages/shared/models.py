"""Tokenizer and model: built offline for the embedded world, or loaded from a local directory / hub id.

- `build_tokenizer(corpus_files, vocab_size)`: byte-level BPE trained on the task corpus; every digit its own token,
  every byte encodable, the four reasoning tags as ordinary (non-special) tokens, role/eos/pad special tokens and a
  chat template whose assistant turns sit inside `{% generation %}` markers (TRL `assistant_only_loss`).
- `build_model(architecture, tokenizer)`: a random-init `Qwen3ForCausalLM` (the caller seeds torch).
- `load_model` / `load_tokenizer`: Auto classes, safetensors only, remote code only when asked; a hub id that cannot
  be reached fails fast with a `UserError` naming `model.source`.
- `model_source(artifact_dir)` / `write_model_ref(...)`: a checkpoint artifact is a `save_pretrained` directory or,
  for hub models the base stage does not copy, a `model_ref.json` {source, revision}.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from stages.shared.data import hub_offline, hub_reachable, plain, resolve_path, sha256_file, write_json
from stages.shared.errors import UserError

THINK_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
USER, ASSISTANT, SYSTEM, EOS, PAD = "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, EOS, USER, ASSISTANT, SYSTEM]  # ids 0..4 in a built tokenizer
log = logging.getLogger(__name__)
MODEL_REF = "model_ref.json"

# Turns are `<|role|>content<|end|>`; the assistant's content and its `<|end|>` are the trainable (generation) part.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{%- elif message['role'] in ['user', 'system'] -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- else -%}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
_TAG_SPLIT = re.compile("|".join(re.escape(t) for t in THINK_TAGS))


# ---------------------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------------------
def _corpus_texts(corpus_files: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Text of every JSONL row (fields text, prompt, messages[].content), split at the tags (they are added tokens,
    so merges are not spent on their pieces)."""
    for f in corpus_files:
        path = resolve_path(f)
        if not path.is_file():
            raise UserError(f"tokenizer corpus file {path} not found (model.tokenizer.corpus); "
                            "`python data/arith/prepare.py` regenerates the embedded task world")
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({e})") from None
                parts = [row.get("text"), row.get("prompt")]
                parts += [m.get("content") for m in row.get("messages") or [] if isinstance(m, dict)]
                for part in parts:
                    if isinstance(part, str) and part:
                        yield from (s for s in _TAG_SPLIT.split(part) if s)


def build_tokenizer(corpus_files: Iterable[str | os.PathLike], vocab_size: int):
    """A byte-level BPE `PreTrainedTokenizerFast` of exactly `vocab_size` tokens, trained on the corpus files.

    Layout: 5 special tokens, the 256-byte alphabet (nothing is ever unknown), merges, then the 4 tags (non-special).
    Deterministic for the same files and size.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    floor = len(SPECIAL_TOKENS) + len(alphabet) + len(THINK_TAGS)
    if vocab_size < floor + 16:
        raise UserError(f"model.tokenizer.vocab_size={vocab_size} is too small: the byte alphabet, special tokens "
                        f"and tags take {floor}; use at least {floor + 16} (e.g. 512)")
    tok = Tokenizer(models.BPE())  # no unk token: the byte alphabet covers every input
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(THINK_TAGS), min_frequency=2,
                                  special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(_corpus_texts(corpus_files), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TAGS])
    if tok.get_vocab_size() != vocab_size:  # the corpus ran out of pairs seen twice: still valid, say so
        log.info(f"build_tokenizer: corpus gave {tok.get_vocab_size()} tokens (< vocab_size={vocab_size})")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, additional_special_tokens=[USER, ASSISTANT, SYSTEM],
        chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False, padding_side="right",
    )


def build_model(architecture: dict, tokenizer):
    """A random-init `Qwen3ForCausalLM` from `Qwen3Config(**architecture)`, sized to the tokenizer, untied embeddings
    unless the architecture says otherwise. Seed torch before calling."""
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    arch = plain(architecture) or {}
    arch.setdefault("tie_word_embeddings", False)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None:
        raise UserError("the tokenizer has no eos token; build_model needs one")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    try:
        config = Qwen3Config(**arch, vocab_size=len(tokenizer), bos_token_id=bos, eos_token_id=eos,
                             pad_token_id=pad if pad is not None else eos)
    except TypeError as e:
        raise UserError(f"model.architecture: {e}") from None
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos,
                                               pad_token_id=pad if pad is not None else eos)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------
_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "auto": "auto"}


def _local_dir(source: str | os.PathLike) -> Path | None:
    """The directory `source` names on this machine (as given, or relative to the project root), else None."""
    for p in (Path(source).expanduser(), resolve_path(source)):
        if p.is_dir():
            return p
    return None


def _looks_local(source: str) -> bool:
    s = str(source)
    return s.startswith(("/", "./", "../", "~")) or s.count("/") > 1 or s.endswith((".json", ".safetensors"))


def _resolve_source(source, revision) -> tuple[str, str | None, bool]:
    """(what to pass to from_pretrained, revision, is_local). Raises UserError for a missing local path."""
    if source is None or str(source) in ("", "build"):
        raise UserError(f"model.source={source!r} names no loadable model: `build` models are built by the base "
                        "stage; pass a checkpoint directory or a hub id")
    local = _local_dir(source)
    if local is not None:
        return str(local), None, True
    if _looks_local(str(source)):
        raise UserError(f"model.source={source}: no such directory")
    return str(source), revision, False


def _hub_error(what: str, source: str, revision, err: Exception) -> UserError:
    if hub_offline():
        why = "HF_HUB_OFFLINE=1 is set and it is not in the local cache"
    elif not hub_reachable():
        why = "the hub is unreachable from this machine and it is not in the local cache"
    else:
        why = f"the hub could not serve it ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    rev = f" at revision {revision}" if revision else ""
    return UserError(f"cannot load {what} {source!r}{rev} from the Hugging Face hub: {why}. Set model.source to a "
                     "local directory holding the model (config.json, *.safetensors, tokenizer files), or allow "
                     "network access (unset HF_HUB_OFFLINE)")


def _hub_kwargs(is_local: bool) -> dict:
    # Offline or unreachable: only the local cache (a miss fails in milliseconds instead of ~50 s of retries).
    return {"local_files_only": True} if (is_local or not hub_reachable()) else {}


def load_tokenizer(source: str | os.PathLike, *, revision: str | None = None, trust_remote_code: bool = False):
    """AutoTokenizer from a local directory or hub id; pad token falls back to eos."""
    from transformers import AutoTokenizer

    src, rev, is_local = _resolve_source(source, revision)
    try:
        tok = AutoTokenizer.from_pretrained(src, revision=rev, trust_remote_code=bool(trust_remote_code),
                                            **_hub_kwargs(is_local))
    except (OSError, ValueError) as e:
        if is_local:
            raise UserError(f"model.source={src}: cannot load a tokenizer from this directory ({e})") from None
        raise _hub_error("tokenizer", src, rev, e) from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(source: str | os.PathLike, *, revision: str | None = None, trust_remote_code: bool = False,
               dtype: str = "float32", device: str | None = None):
    """AutoModelForCausalLM from a local directory or hub id (safetensors only, remote code only when asked)."""
    import torch
    from transformers import AutoModelForCausalLM

    if str(dtype) not in _DTYPES:
        raise UserError(f"dtype={dtype!r} (from hardware.weights_dtype / hardware.bf16): use one of "
                        f"{sorted(_DTYPES)}")
    name = _DTYPES[str(dtype)]
    torch_dtype = name if name == "auto" else getattr(torch, name)
    src, rev, is_local = _resolve_source(source, revision)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, revision=rev, trust_remote_code=bool(trust_remote_code),
                                                     dtype=torch_dtype, use_safetensors=True,
                                                     **_hub_kwargs(is_local))
    except (OSError, ValueError) as e:
        if is_local:
            raise UserError(f"model.source={src}: cannot load a causal LM from this directory ({e})") from None
        raise _hub_error("model", src, rev, e) from None
    if device:
        model.to(device)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint artifacts
# ---------------------------------------------------------------------------------------------------------------------
def context_length(source: str | os.PathLike, *, revision: str | None = None,
                   trust_remote_code: bool = False) -> int | None:
    """The model's context in tokens (`max_position_embeddings` of its config.json), None when it has none."""
    from transformers import AutoConfig

    src, rev, is_local = _resolve_source(source, revision)
    try:
        config = AutoConfig.from_pretrained(src, revision=rev, trust_remote_code=bool(trust_remote_code),
                                            **_hub_kwargs(is_local))
    except (OSError, ValueError) as e:
        raise UserError(f"model {src!r}: cannot read its config.json ({e})") from None
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    return int(limit) if limit else None


def fit_to_context(key: str, value: int, limit: int | None, *, prompt_tokens: int = 0) -> int:
    """`value` (the length that config key `key` asks for) capped so that prompt_tokens + value fit the model's
    context `limit`. A cap is logged: nothing is cut silently (RoPE past its range, generations truncated by the
    engine). A prompt that alone fills the context is a UserError naming the key."""
    value = int(value)
    if limit is None or prompt_tokens + value <= limit:
        return value
    if limit - prompt_tokens < 1:
        raise UserError(f"{key}: the longest prompt has {prompt_tokens} tokens, the model's whole context "
                        f"(max_position_embeddings={limit}); shorten or filter the prompts")
    fitted = limit - prompt_tokens
    log.warning("%s=%d does not fit the model's context of %d positions%s: using %d", key, value, limit,
                f" after a {prompt_tokens}-token prompt" if prompt_tokens else "", fitted)
    return fitted


def write_model_ref(directory: str | os.PathLike, source: str, revision: str | None) -> Path:
    """Record a hub/local model the base stage does not copy: `<dir>/model_ref.json` {source, revision}."""
    return write_json(Path(directory) / MODEL_REF, {"source": str(source), "revision": revision})


def model_source(artifact_dir: str | os.PathLike) -> tuple[str, str | None]:
    """(source, revision) to load a checkpoint artifact: its own directory when it holds config.json, else what its
    model_ref.json names."""
    d = Path(artifact_dir)
    if (d / "config.json").is_file():
        return str(d), None
    ref = d / MODEL_REF
    if ref.is_file():
        try:
            data = json.loads(ref.read_text())
            return str(data["source"]), data.get("revision")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{ref}: damaged model reference ({type(e).__name__}: {e}); delete the artifact to "
                            "rebuild it") from None
    raise UserError(f"{d} is not a model checkpoint: neither config.json nor {MODEL_REF} is there")


def record_source(source: str, revision: str | None, output_dir: Path, *, key: str = "model.source") -> dict:
    """Record a hub model (pinned to the commit its revision resolves to) or a local save_pretrained directory
    (with the sha256 of every file) as a checkpoint artifact: model_ref.json instead of weights."""
    source = str(source)
    local = Path(source).expanduser()
    if local.exists() or source.startswith((".", "/", "~")):
        if not local.is_dir():
            raise UserError(f"{key}={source!r} is not a directory; give a save_pretrained directory or a "
                            f"hub id (org/name)")
        files = sorted(p for p in local.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not any(p.name == "config.json" for p in files):
            raise UserError(f"{key}={source!r} has no config.json; point it at a save_pretrained directory")
        hashes = {str(p.relative_to(local)): sha256_file(p) for p in files}
        pinned = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in hashes.items()).encode()).hexdigest()
        write_model_ref(output_dir, str(local.resolve()), None)
        (output_dir / "source_files.json").write_text(json.dumps(hashes, indent=1))
        log.info(f"local model {local} ({len(files)} files, content sha256 {pinned[:12]})")
        return {"source_kind": "local", "files": len(files), "content_sha256": pinned}

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    commit = resolve_hub_revision(source, revision, offline, key)
    write_model_ref(output_dir, source, commit)
    log.info(f"hub model {source}@{revision or 'main'} pinned to {commit}")
    return {"source_kind": "hub", "revision": commit}


def resolve_hub_revision(source: str, revision: str | None, offline: bool, key: str = "model.source") -> str:
    """The commit sha of source@revision: from the local cache when offline, from the hub otherwise."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        if offline:
            path = snapshot_download(source, revision=revision, local_files_only=True,
                                     allow_patterns=["config.json"])
            return Path(path).name  # snapshots/<commit sha>
        return HfApi().model_info(source, revision=revision).sha
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, FileNotFoundError) as e:
        raise UserError(
            f"{key}={source!r} (revision {revision or 'main'}) is not in the local Hugging Face cache and the "
            f"hub is offline (HF_HUB_OFFLINE=1). Download it first (`HF_HUB_OFFLINE=0 huggingface-cli download "
            f"{source}`), unset HF_HUB_OFFLINE, or set model.source to a local directory. ({type(e).__name__})"
        ) from None
    except HfHubHTTPError as e:
        raise UserError(f"{key}={source!r} revision {revision or 'main'} could not be resolved on the hub: "
                        f"{e}") from None
