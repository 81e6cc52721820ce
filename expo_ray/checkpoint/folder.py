"""A Hugging Face model folder: its safetensors shards, index, config and tokenizer files."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..errors import InvalidCheckpoint, StorageError
from ..storage import Source, Storage, clean_key
from .safetensors_io import Header, TensorInfo, read_header

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"  # an expo-ray variant's record, written last (expo_ray.publish.manifest)
MAX_JSON_BYTES = 64 * 1024 * 1024

# Files copied from the aligned model into every variant (when present).
AUX_FILES = (
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
    "chat_template.jinja", "chat_template.json",
)
# Licence and notice files (LICENSE.txt, NOTICE, USE_POLICY.md, ...) travel with the weights.
LICENSE_PREFIXES = ("license", "licence", "copying", "notice", "use_policy")
PICKLE_HINT = (
    "pickle checkpoints (.bin/.pt) are never loaded because unpickling runs arbitrary code; "
    "convert it to safetensors first (for a model you trust: "
    "AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True))"
)


@dataclass(frozen=True)
class TensorLocation:
    shard: str
    info: TensorInfo


def read_json(storage: Storage | Source, key: str) -> dict:
    data = storage.read_bytes(key, limit=MAX_JSON_BYTES)
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidCheckpoint(f"{storage.describe(key)}: not valid JSON ({exc})") from None
    except RecursionError:
        raise InvalidCheckpoint(f"{storage.describe(key)}: JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise InvalidCheckpoint(f"{storage.describe(key)}: expected a JSON object")
    return value


class Checkpoint:
    """Opens and validates a model folder from headers and small files only (no tensor data).

    `source` pins every file read here (index, config, shard headers) to the version read; a
    plan pins the side files its commit copies too, and carries the source to the tasks and the
    commit, whose reads must be of the same versions."""

    def __init__(self, source: Source, headers: dict[str, Header], weight_map: dict[str, str] | None,
                 config: dict | None, files: list[str]):
        self.source = source
        self.storage = source.storage
        self.headers = headers  # shard key -> header, in shard order
        self.has_index = weight_map is not None
        self.config = config
        self.files = files
        self.tensors: dict[str, TensorLocation] = {}
        for shard, header in headers.items():
            for info in header.tensors:
                self.tensors[info.name] = TensorLocation(shard, info)

    @property
    def uri(self) -> str:
        return self.storage.uri

    @property
    def shards(self) -> list[str]:
        return list(self.headers)

    @property
    def total_bytes(self) -> int:
        return sum(h.file_size for h in self.headers.values())

    def aux_files(self) -> list[str]:
        """Side files copied into every variant: config, tokenizer, licences, and the model code
        when config.json's auto_map names some (it runs only with --trust-remote-code)."""
        extra = {f for f in self.files if f.lower().startswith(LICENSE_PREFIXES)}
        if (self.config or {}).get("auto_map"):
            extra |= {f for f in self.files if f.endswith(".py")}
        return [f for f in AUX_FILES if f in self.files] + sorted(extra - set(AUX_FILES))

    @classmethod
    def open(cls, source: str | Storage | Source, require_config: bool = True) -> "Checkpoint":
        source = Source.open(source)
        storage = source.storage
        files = storage.list()
        top = [f for f in files if "/" not in f]
        if not files:
            raise InvalidCheckpoint(f"{storage.describe()}: no such model folder, or it is empty")
        if INDEX_FILE in top:
            weight_map = cls._read_index(source)
            shards = sorted(set(weight_map.values()))
        elif SINGLE_FILE in top:
            weight_map, shards = None, [SINGLE_FILE]
        else:
            pickles = [f for f in top
                       if f.endswith((".bin", ".pt", ".pth", ".ckpt")) or f == "pytorch_model.bin.index.json"]
            if pickles:
                raise InvalidCheckpoint(f"{storage.describe(pickles[0])}: {PICKLE_HINT}")
            raise InvalidCheckpoint(f"{storage.describe()}: not a safetensors model folder (no {SINGLE_FILE} or "
                                    f"{INDEX_FILE})")

        missing = [s for s in shards if s not in files]
        if missing:
            raise InvalidCheckpoint(f"{storage.describe(INDEX_FILE)}: names shard {missing[0]!r}, which does not "
                                    "exist" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        def header(shard: str) -> Header:
            with source.open_reader(shard) as reader:  # pins the shard to the version read
                return read_header(storage, shard, reader)

        with ThreadPoolExecutor(max_workers=min(16, len(shards))) as pool:
            headers = dict(zip(shards, pool.map(header, shards)))

        seen: dict[str, str] = {}
        for shard, header in headers.items():
            for info in header.tensors:
                if info.name in seen:
                    raise InvalidCheckpoint(f"{storage.describe(shard)}: tensor {info.name!r} also appears in "
                                            f"{seen[info.name]}")
                seen[info.name] = shard
        if not seen:
            raise InvalidCheckpoint(f"{storage.describe(shards[0])}: holds no tensors; not a model")
        if weight_map is not None:
            for name, shard in weight_map.items():
                if seen.get(name) != shard:
                    where = f"it is in {seen[name]}" if name in seen else "no shard has it"
                    raise InvalidCheckpoint(f"{storage.describe(INDEX_FILE)}: maps tensor {name!r} to {shard}, but "
                                            f"{where}")
            extra = sorted(set(seen) - set(weight_map))
            if extra:
                raise InvalidCheckpoint(f"{storage.describe(seen[extra[0]])}: tensor {extra[0]!r} is not in "
                                        f"{INDEX_FILE}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))

        config = None
        if "config.json" in top:
            config = read_json(source, "config.json")
        elif require_config:
            raise InvalidCheckpoint(f"{storage.describe('config.json')}: missing; a model folder needs its config.json")
        return cls(source, headers, weight_map, config, top)

    def side_files(self) -> list[str]:
        """Files other than the shards that a variant's identity covers and its commit copies or
        reads: the side files, and README.md (its licence goes into the variants' cards)."""
        return self.aux_files() + (["README.md"] if "README.md" in self.files else [])

    @staticmethod
    def _read_index(storage: Storage | Source) -> dict[str, str]:
        index = read_json(storage, INDEX_FILE)
        label = storage.describe(INDEX_FILE)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InvalidCheckpoint(f"{label}: no weight_map (or it is empty)")
        for name, shard in weight_map.items():
            if not isinstance(shard, str):
                raise InvalidCheckpoint(f"{label}: weight_map entry for {name!r} is not a file name")
            try:
                key = clean_key(shard)
            except StorageError:
                raise InvalidCheckpoint(f"{label}: weight_map names {shard!r}, a path outside the model folder; "
                                        "refused") from None
            if "/" in key:
                raise InvalidCheckpoint(f"{label}: weight_map names {shard!r}; shards must sit in the model folder "
                                        "itself")
            if not key.endswith(".safetensors"):
                raise InvalidCheckpoint(f"{label}: weight_map names {shard!r}, not a .safetensors file")
        return weight_map
