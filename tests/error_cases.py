"""Every wrong input and fault the lab names, with the one line a user sees: the table behind
tests/test_errors.py and docs/troubleshooting.md.

Each Case runs one notebook as a script (`notebooks/<script>.py`) in its own folder, with
LAB_ROOT=<folder>/runs and, when `config` is given, LAB_CONFIG=<folder>/lab.yml holding BASE
merged with `config` (or `config` itself when it is raw YAML text). The test asserts the exit
status, that the message is the last line of stderr (or, for cases that continue, a line of
stdout), that no traceback was printed, and that every file already under LAB_ROOT is byte for
byte unchanged; a refused start (every group but Data) must not have written anything at all.

Message templates: `{dir}` is the case's folder and `{…}` stands for any text (a free-space
figure, a library's own wording). A case whose fix belongs to another module names it in
`owner`; its test is an expected failure until that module is fixed, and its message template
only pins what the line must contain.

`python tests/error_cases.py` rewrites docs/troubleshooting.md from this table.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "troubleshooting.md"

# The shortest useful run: the tiny model, short rows, a few steps.
BASE = {
    "model": {"max_length": 128},
    "train": {"max_steps": 4, "save_steps": 2, "learning_rate": 1e-3},
}

# Distinctive fake credentials: every case runs with them set, and no output or file may contain them.
FAKE_SECRETS = {
    "HF_TOKEN": "hf_LabFakeToken0123456789abcdefXYZ",
    "WANDB_API_KEY": "0123456789abcdef0123456789abcdefLABFAKE1",
}


# --------------------------------------------------------------------------------------------- data


def _turns(question: str, answer: str | None, *, role: str = "human") -> dict:
    conv = [{"from": "system", "value": "You are a pricing assistant."}, {"from": role, "value": question}]
    if answer is not None:
        conv.append({"from": "gpt", "value": answer})
    return {"conversations": conv}


def pricer_jsonl(n: int = 40, *, bad_lines: dict[int, str] | None = None, long_rows: tuple[int, ...] = (),
                 roles: dict[int, str] | None = None) -> str:
    """Return n ShareGPT lines of the Pricer task; replace lines (1-based) or make some rows long or odd."""
    lines = []
    for i in range(1, n + 1):
        question = f"What is the price of item {i}? Basic speaker number {i}, black."
        if i in long_rows:
            question += " very long description" * 120
        row = _turns(question, f"Price is ${10 + i}", role=(roles or {}).get(i, "human"))
        lines.append(json.dumps(row))
    for number, text in (bad_lines or {}).items():
        lines[number - 1] = text
    return "\n".join(lines) + "\n"


DEEP_ROW = "[" * 5000 + "]" * 5000  # a row nested 5000 deep: pyarrow's reader crashed the process on it
CSV_BOM_RAGGED = "\ufeffinstruction,output\nPrice of a lamp?,Price is $20\nPrice of a mug?,Price is $5\n" \
    "Price of a chair, large?,Price is $40\nPrice of a pen?,Price is $1\n"
# nine aliases of nine aliases …: 9**9 strings once expanded (a "billion laughs")
ALIAS_BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)
# another trainer's lock; its heartbeat is written 10 min ahead ({now}), as another machine's clock may be,
# so it stays fresh however slowly this machine reaches the training cell
OTHER_TRAINER = json.dumps({"pid": 4242, "host": "other-colab-vm", "started": 1767225600.0, "heartbeat": "{now}",
                            "token": "other"}).replace('"{now}"', "{now}")
NO_ANSWERS = "\n".join(json.dumps(_turns(f"What is the price of item {i}?", None)) for i in range(1, 21)) + "\n"
BROKEN_ARRAY = "[\n" + ",\n".join(json.dumps(_turns(f"Item {i}?", f"Price is ${i}")) for i in range(1, 4)) + ",\n{oops}\n]\n"
CSV_OTHER_COLUMNS = "a,b\n1,2\n3,4\n"


# --------------------------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Case:
    """One wrong input: what it is, where it shows, and the line the user reads."""

    id: str
    group: str
    bad: str  # the wrong input, in words
    script: str  # the notebook (run as a script) that shows the message
    message: str  # the ✗ line (exit 2) or a stdout line (exit 0); see the module docstring
    config: dict | str | None = None  # LAB_CONFIG: merged over BASE with run_name = id, or raw YAML text
    env: dict = field(default_factory=dict)  # extra environment ("{dir}" is replaced)
    files: dict = field(default_factory=dict)  # relative path → text, written before anything runs
    before: tuple[str, ...] = ()  # run first and must succeed: notebook names, or "start" (lab.start() only)
    trained: bool = False  # run against the module's shared trained run instead of a fresh folder
    exit: int = 2  # 2: stops with the message; 0: continues and says so
    colab: str | None = None  # a stand-in google.colab: "mount-fails" or "mount-empty"
    cpu_only: bool = False  # the case is about a machine without a GPU
    owner: str | None = None  # module whose fix is pending: the test is xfail(strict) until then


CASES: list[Case] = [
    # ------------------------------------------------------------------ Config
    Case(
        "yaml-syntax", "Config", "YAML syntax error (an unclosed `{`)", "00_setup",
        "config file '{dir}/lab.yml': YAML syntax error at line 2, column 6 ('model: {max_length: 128}'): "
        "expected ',' or '}', but got ':' (while parsing a flow mapping that starts at line 1, column 8) — a { … } "
        "mapping is not closed or lacks a comma — check the braces on that line",
        config="train: {max_steps: 4\nmodel: {max_length: 128}\n",
    ),
    Case(
        "yaml-tab", "Config", "a tab used for indentation", "00_setup",
        "config file '{dir}/lab.yml': YAML syntax error at line 2, column 1 ('max_steps: 4'): found character "
        "'\\t' that cannot start any token — YAML indents with spaces, never tabs — replace the tab",
        config="train:\n\tmax_steps: 4\n",
    ),
    Case(
        "yaml-duplicate-key", "Config", "the same key twice in one section", "00_setup",
        "config file '{dir}/lab.yml': key 'learning_rate' appears twice (lines 2 and 3) — keep one; YAML would "
        "silently use the last",
        config="train:\n  learning_rate: 1e-3\n  learning_rate: 2e-4\n",
    ),
    Case(
        "yaml-not-mapping", "Config", "a config file that is a list, not sections", "00_setup",
        "config file '{dir}/lab.yml' must be a mapping of sections (run_name:, model:, train: …), got a list — "
        "see the example in the README",
        config="- model\n- train\n",
    ),
    Case(
        "unknown-section", "Config", "a misspelt section (`traing:`)", "00_setup",
        "unknown config section 'traing' in LAB_CONFIG ({dir}/lab.yml) → did you mean 'train'? "
        "(sections: model, data, lora, train, checkpoint, eval, export, sweep)",
        config={"traing": {"max_steps": 4}},
    ),
    Case(
        "unknown-train-key", "Config", "a misspelt trl.SFTConfig key (`train.learnin_rate`)", "00_setup",
        "unknown key train.learnin_rate (not a trl.SFTConfig field) → did you mean 'learning_rate'?",
        config={"train": {"learnin_rate": 1e-3}},
    ),
    Case(
        "unknown-lora-key", "Config", "a misspelt peft.LoraConfig key (`lora.lora_droput`)", "00_setup",
        "unknown key lora.lora_droput (not a peft.LoraConfig field) → did you mean 'lora_dropout'?",
        config={"lora": {"lora_droput": 0.2}},
    ),
    Case(
        "unknown-model-key", "Config", "a misspelt lab key (`model.max_len`)", "00_setup",
        "unknown key model.max_len → did you mean 'max_length'? "
        "(keys of model: name, tokenizer, load_in_4bit, max_length, trust_remote_code, revision)",
        config={"model": {"max_len": 256}},
    ),
    Case(
        "section-not-mapping", "Config", "a section given a value (`train: 5`)", "00_setup",
        "config section 'train' in LAB_CONFIG ({dir}/lab.yml) must be a mapping of keys (write `train:` with its "
        "keys indented below it), got 5",
        config="train: 5\n",
    ),
    Case(
        "number-is-text", "Config", "a number that is words (`learning_rate: fast`)", "00_setup",
        "train.learning_rate must be a number, got 'fast' — e.g. learning_rate: 2e-4",
        config={"train": {"learning_rate": "fast"}},
    ),
    Case(
        "list-for-scalar", "Config", "a list where one value is expected", "00_setup",
        "train.learning_rate takes one value, got a list [0.0001, 0.0002] — e.g. learning_rate: 2e-4",
        config={"train": {"learning_rate": [1e-4, 2e-4]}},
    ),
    Case(
        "mapping-for-scalar", "Config", "a mapping where one value is expected", "00_setup",
        "train.save_steps takes one value, got a mapping {'every': 10} — e.g. save_steps: 50",
        config={"train": {"save_steps": {"every": 10}}},
    ),
    Case(
        "bool-as-text", "Config", "a boolean written as text (`\"true\"`)", "00_setup",
        "train.gradient_checkpointing must be true or false, got the text 'true' — write true without quotes",
        config={"train": {"gradient_checkpointing": "true"}},
    ),
    Case(
        "bool-as-number", "Config", "a boolean written as 1", "00_setup",
        "model.load_in_4bit must be true or false, got 1 — write true or false",
        config={"model": {"load_in_4bit": 1}},
    ),
    Case(
        "int-with-fraction", "Config", "a step count with a fraction", "00_setup",
        "train.max_steps must be a whole number, got 10.5 — e.g. max_steps: 200",
        config={"train": {"max_steps": 10.5}},
    ),
    Case(
        "negative-epochs", "Config", "a negative number (`num_train_epochs: -1`)", "00_setup",
        "train.num_train_epochs must be > 0, got -1 — e.g. num_train_epochs: 1",
        config={"train": {"num_train_epochs": -1}},
    ),
    Case(
        "negative-any-number", "Config", "a negative value for any numeric SFTConfig field", "00_setup",
        "train.max_grad_norm must not be negative, got -1 — e.g. max_grad_norm: 1.0",
        config={"train": {"max_grad_norm": -1}},
    ),
    Case(
        "max-steps-negative", "Config", "max_steps below -1", "00_setup",
        "train.max_steps must be -1 (run all epochs) or a step count ≥ 1, e.g. 200, got -5",
        config={"train": {"max_steps": -5}},
    ),
    Case(
        "zero-batch", "Config", "a batch size of 0", "00_setup",
        "train.per_device_train_batch_size must be ≥ 1, got 0 — e.g. per_device_train_batch_size: 4",
        config={"train": {"per_device_train_batch_size": 0}},
    ),
    Case(
        "lora-rank-negative", "Config", "a negative LoRA rank", "00_setup",
        "lora.r must be ≥ 1, got -8 — e.g. r: 32",
        config={"lora": {"r": -8}},
    ),
    Case(
        "val-fraction-above-one", "Config", "`val_fraction` outside (0, 1)", "00_setup",
        "data.val_fraction must be in (0, 1), got 1.5 — e.g. val_fraction: 0.05",
        config={"data": {"val_fraction": 1.5}},
    ),
    Case(
        "val-fraction-zero", "Config", "`val_fraction: 0`", "00_setup",
        "data.val_fraction must be in (0, 1), got 0 — e.g. val_fraction: 0.05",
        config={"data": {"val_fraction": 0}},
    ),
    Case(
        "enum-typo", "Config", "a value outside a library's choices (`lr_scheduler_type: cosin`)", "00_setup",
        "train.lr_scheduler_type must be one of linear, cosine, cosine_with_restarts, polynomial, constant, "
        "constant_with_warmup, inverse_sqrt, reduce_lr_on_plateau, cosine_with_min_lr, cosine_warmup_with_min_lr, "
        "warmup_stable_decay, greedy, got 'cosin' → did you mean 'cosine'?",
        config={"train": {"lr_scheduler_type": "cosin"}},
    ),
    Case(
        "lab-choice-typo", "Config", "a value outside the lab's choices (`data.on_too_long: cut`)", "00_setup",
        "data.on_too_long must be one of drop, truncate, got 'cut'",
        config={"data": {"on_too_long": "cut"}},
    ),
    Case(
        "reserved-train-key", "Config", "a train: key the lab sets itself (`train.max_length`)", "00_setup",
        "train.max_length is set by the lab: it is model.max_length — set that instead",
        config={"train": {"max_length": 256}},
    ),
    Case(
        "library-refuses", "Config", "settings trl.SFTConfig refuses together", "00_setup",
        "trl.SFTConfig refuses the train: section (--load_best_model_at_end requires the saving steps to be a "
        "round multiple of the evaluation steps, but found 7, which is not a round multiple of 5.) — change the "
        "train: keys it names",
        config={"train": {"load_best_model_at_end": True, "save_steps": 7, "eval_steps": 5}},
    ),
    Case(
        "fp16-on-cpu", "Config", "`train.fp16: true` on a machine without a GPU", "00_setup",
        "train.fp16 needs a CUDA GPU, and this machine has none — remove it: the lab picks the precision for the hardware",
        config={"train": {"fp16": True}}, cpu_only=True,
    ),
    Case(
        "role-map-typo", "Config", "a data.role_map target that is not a role", "00_setup",
        "data.role_map maps 'bot' to 'assitant' — map it to one of system, user, assistant, tool, function_call → did you mean 'assistant'?",
        config={"data": {"role_map": {"bot": "assitant"}}},
    ),
    Case(
        "gguf-not-list", "Config", "`export.gguf: q8_0` instead of a list", "00_setup",
        "export.gguf must be a list, got 'q8_0' — e.g. gguf: [\"f16\", \"q8_0\"]",
        config={"export": {"gguf": "q8_0"}},
    ),
    Case(
        "gguf-unknown-type", "Config", "a GGUF type the export cannot write", "00_setup",
        "export.gguf must list values from f16, bf16, f32, q8_0, q4_k_m, got 'q3'",
        config={"export": {"gguf": ["f16", "q3"]}},
    ),
    Case(
        "bad-regex", "Config", "an eval.metric_pattern that is not a regular expression", "00_setup",
        "eval.metric_pattern '(unclosed' is not a valid regular expression (missing ), unterminated subpattern at position 0)",
        config={"eval": {"metric": "regex", "metric_pattern": "(unclosed"}},
    ),
    Case(
        "run-name-unsafe", "Config", "a run_name that is not a safe folder name", "00_setup",
        "run_name must be a safe folder name (letters, digits, '.', '_', '-'; at most 64; no spaces or '/'), "
        "got 'my run/1' (has ' ' '/') — e.g. my-run-1",
        config="run_name: my run/1\n",
    ),
    Case(
        "run-name-escape", "Config", "a run_name that leaves the runs folder (`../x`)", "00_setup",
        "run_name must be a safe folder name (letters, digits, '.', '_', '-'; at most 64; no spaces or '/'), "
        "got '../escape' (has '/') — e.g. escape",
        config="run_name: ../escape\n",
    ),
    Case(
        "run-name-newline", "Config", "a run_name ending in a line break (`\"trail\\n\"`)", "00_setup",
        "run_name must be a safe folder name (letters, digits, '.', '_', '-'; at most 64; no spaces or '/'), "
        "got 'trail\\n' (has '\\n') — e.g. trail",
        config='run_name: "trail\\n"\n',
    ),
    Case(
        "yaml-alias-bomb", "Config", "a YAML alias bomb (aliases of aliases: billions of values)", "00_setup",
        "config file '{dir}/lab.yml': its aliases (*name) expand to more than 100,000 values (an alias bomb?) — "
        "write the values out, or use fewer aliases",
        config=ALIAS_BOMB,
    ),
    Case(
        "yaml-too-deep", "Config", "a YAML config nested thousands of levels deep", "00_setup",
        "config file '{dir}/lab.yml' nests deeper than 50 levels — a config needs two or three: flatten it",
        config="train: " + "[" * 3000 + "]" * 3000 + "\n",
    ),
    Case(
        "lab-run-name-unsafe", "Config", "LAB_RUN_NAME that is not a safe folder name", "00_setup",
        "LAB_RUN_NAME must be a safe folder name (letters, digits, '.', '_', '-'; at most 64; no spaces or '/'), "
        "got 'a b' (has ' ') — e.g. a-b",
        env={"LAB_RUN_NAME": "a b"},
    ),
    Case(
        "profile-unknown", "Config", "an unknown LAB_PROFILE", "00_setup",
        "LAB_PROFILE must be one of auto, colab-t4, colab-l4, colab-a100, cpu-smoke, got 'colab-t5' → did you mean 'colab-t4'?",
        env={"LAB_PROFILE": "colab-t5"},
    ),
    Case(
        "profile-needs-gpu", "Config", "LAB_PROFILE=colab-t4 on a machine without a GPU", "00_setup",
        "LAB_PROFILE colab-t4 needs a CUDA GPU (T4), and this machine has none — on Colab pick Runtime → Change "
        "runtime type → T4 GPU; elsewhere set LAB_PROFILE=auto (or cpu-smoke)",
        env={"LAB_PROFILE": "colab-t4"}, cpu_only=True,
    ),
    # ------------------------------------------------------------------ Secrets
    Case(
        "token-in-config", "Secrets", "a token written into the config (`train.hub_token`)", "00_setup",
        "train.hub_token would store a secret in the run's config.yaml on Drive — remove it and put the token in "
        "Colab's secrets (key icon) or an environment variable: HF_TOKEN, WANDB_API_KEY",
        config={"train": {"hub_token": FAKE_SECRETS["HF_TOKEN"]}},
    ),
    Case(
        "token-as-value", "Secrets", "a token pasted as some other value", "00_setup",
        "model.name holds what looks like an access token — remove it from the config; tokens belong in Colab's "
        "secrets (key icon) or the HF_TOKEN / WANDB_API_KEY environment variables",
        config={"model": {"name": FAKE_SECRETS["HF_TOKEN"]}},
    ),
    Case(
        "token-wandb-in-run-name", "Secrets", "a W&B key (40 hex characters) as the run_name", "00_setup",
        "run_name holds what looks like an access token — remove it from the config; tokens belong in Colab's "
        "secrets (key icon) or the HF_TOKEN / WANDB_API_KEY environment variables",
        config="run_name: 0123456789abcdef0123456789abcdef01234567\n",
    ),
    # ------------------------------------------------------------------ Paths and storage
    Case(
        "config-missing", "Paths and storage", "LAB_CONFIG names a file that does not exist", "00_setup",
        "config file '{dir}/nope.yml' does not exist — check LAB_CONFIG / the path you gave",
        env={"LAB_CONFIG": "{dir}/nope.yml"},
    ),
    Case(
        "config-is-folder", "Paths and storage", "LAB_CONFIG names a folder", "00_setup",
        "config file '{dir}' is a folder — point LAB_CONFIG at a .yaml file inside it",
        env={"LAB_CONFIG": "{dir}"},
    ),
    Case(
        "config-empty", "Paths and storage", "LAB_CONFIG names an empty file", "00_setup",
        "config file '{dir}/lab.yml' is empty — write at least `run_name: my-run`",
        config="\n",
    ),
    Case(
        "lab-root-under-file", "Paths and storage", "LAB_ROOT cannot be created (a file is in the way)", "00_setup",
        "cannot create the runs folder '{dir}/afile/runs': '{dir}/afile' is a file, not a folder — point LAB_ROOT "
        "at a folder you can write to",
        env={"LAB_ROOT": "{dir}/afile/runs"}, files={"afile": "not a folder"},
    ),
    Case(
        "lab-root-not-writable", "Paths and storage", "LAB_ROOT is not writable", "00_setup",
        "cannot write to the runs folder '/proc' ({…}) — point LAB_ROOT at a folder you can write to",
        env={"LAB_ROOT": "/proc"},
    ),
    Case(
        "drive-mount-fails", "Paths and storage", "Google Drive does not mount (dialog dismissed)", "00_setup",
        "Google Drive did not mount (credential propagation was unsuccessful) — run this cell again and allow "
        "access; or, to keep runs on this Colab disk, which is wiped at every disconnect, set LAB_ROOT (e.g. /content/runs)",
        env={"LAB_ROOT": ""}, colab="mount-fails",
    ),
    Case(
        "drive-not-mounted", "Paths and storage", "Drive reports mounted but MyDrive is missing", "00_setup",
        "Google Drive reported mounted, but /content/drive/MyDrive is missing — run this cell again (Runtime → "
        "Disconnect and delete runtime if it persists); or set LAB_ROOT to keep runs on this Colab disk, which is "
        "wiped at every disconnect",
        env={"LAB_ROOT": ""}, colab="mount-empty",
    ),
    Case(
        "disk-nearly-full", "Paths and storage", "less free space than checkpoint.min_free_gib", "00_setup",
        "only {…} GiB free on {dir}/runs (checkpoint.min_free_gib: 1e+06) — free space (delete old runs or "
        "exports, then empty Drive's trash) or lower checkpoint.min_free_gib; nothing was written",
        config={"checkpoint": {"min_free_gib": 1e6}},
    ),
    Case(
        "data-missing", "Paths and storage", "data.path names a file that does not exist", "00_setup",
        "data.path '{dir}/nope.jsonl' does not exist — check the path (a hub dataset id looks like 'org/name')",
        config={"data": {"path": "{dir}/nope.jsonl"}},
    ),
    Case(
        "data-drive-missing", "Paths and storage", "data.path on Drive that is not there", "00_setup",
        "data.path '/content/drive/MyDrive/data/prices.jsonl' does not exist (is Google Drive mounted, and is the "
        "file under MyDrive?) — check the path (a hub dataset id looks like 'org/name')",
        config={"data": {"path": "/content/drive/MyDrive/data/prices.jsonl"}},
    ),
    Case(
        "data-empty-file", "Paths and storage", "data.path names an empty file", "00_setup",
        "data.path '{dir}/empty.jsonl' is an empty file — check the file, or point data.path elsewhere",
        config={"data": {"path": "{dir}/empty.jsonl"}}, files={"empty.jsonl": ""},
    ),
    Case(
        "data-wrong-type", "Paths and storage", "data.path names a file of an unsupported type", "00_setup",
        "data.path '{dir}/notes.txt' is a .txt file — use a .csv/.json/.jsonl/.parquet/.tsv file",
        config={"data": {"path": "{dir}/notes.txt"}}, files={"notes.txt": "some notes\n"},
    ),
    Case(
        "data-folder-without-data", "Paths and storage", "data.path names a folder with no data files", "00_setup",
        "data.path '{dir}/data' is a folder with no .csv/.json/.jsonl/.parquet/.tsv file in it — point it at one",
        config={"data": {"path": "{dir}/data"}}, files={"data/readme.md": "nothing here\n"},
    ),
    Case(
        "data-hub-unreachable", "Paths and storage", "a hub dataset id while the Hub cannot be reached", "00_setup",
        "data.path 'someorg/some-dataset' is not on this machine and the Hugging Face Hub cannot be reached to fetch "
        "the dataset — check the internet connection (on Colab: Runtime → Restart session), or download it and give "
        "its local path",
        config={"data": {"path": "someorg/some-dataset"}},
        env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": ""},
    ),
    # ------------------------------------------------------------------ Data
    Case(
        "malformed-jsonl-line", "Data", "one malformed JSONL line among good rows", "01_data",
        "⚠ 1 line(s) are not valid JSON objects (first: rows.jsonl line 3: {…}); they are dropped as "
        "'malformed_json' and listed in the report", exit=0,
        config={"data": {"path": "{dir}/rows.jsonl"}}, files={"rows.jsonl": pricer_jsonl(bad_lines={3: "{oops"})},
        before=("start",),
    ),
    Case(
        "deep-jsonl-row", "Data", "a JSONL row nested thousands of levels deep (dropped, reported)", "01_data",
        "⚠ 1 line(s) are not valid JSON objects (first: rows.jsonl line 3: nested deeper than 100 levels); they are "
        "dropped as 'malformed_json' and listed in the report", exit=0,
        config={"data": {"path": "{dir}/rows.jsonl"}}, files={"rows.jsonl": pricer_jsonl(bad_lines={3: DEEP_ROW})},
        before=("start",),
    ),
    Case(
        "invalid-utf8-line", "Data", "a JSONL line that is not UTF-8 text (dropped, reported)", "01_data",
        "⚠ 1 line(s) are not valid JSON objects (first: rows.jsonl line 4: not valid UTF-8 text (byte 0xff at "
        "column {…})); they are dropped as 'malformed_json' and listed in the report", exit=0,
        config={"data": {"path": "{dir}/rows.jsonl"}},
        files={"rows.jsonl": pricer_jsonl(bad_lines={4: '{"conversations": "\udcff\udcfe broken"}'})},
        before=("start",),
    ),
    Case(
        "csv-bom-ragged", "Data", "a CSV with a byte-order mark and a line with one cell too many", "01_data",
        "data file '{dir}/rows.csv' line 4 has 3 cells, its header has 2 — put quotes around cells that contain "
        "',' or a line break (\"a, b\"), or fix that line",
        config={"data": {"path": "{dir}/rows.csv"}}, files={"rows.csv": CSV_BOM_RAGGED}, before=("start",),
    ),
    Case(
        "broken-json-array", "Data", "a JSON array file broken at one line", "01_data",
        "data file '{dir}/rows.json' is not valid JSON ({…} at line 5) — fix the file, or write one JSON object "
        "per line (JSONL) so a bad line costs only that row",
        config={"data": {"path": "{dir}/rows.json"}}, files={"rows.json": BROKEN_ARRAY}, before=("start",),
    ),
    Case(
        "wrong-columns", "Data", "a CSV whose columns match no known format", "01_data",
        "Cannot detect the data format, got columns ['a', 'b'] — set data.format to one of {…} or rename the "
        "columns.",
        config={"data": {"path": "{dir}/rows.csv"}}, files={"rows.csv": CSV_OTHER_COLUMNS}, before=("start",),
    ),
    Case(
        "format-mismatch", "Data", "data.format that does not match the rows", "01_data",
        "data.format is 'alpaca' but the data has no column 'instruction' (columns: ['conversations']) — set "
        "data.format: auto, or rename the columns",
        config={"data": {"path": "{dir}/rows.jsonl", "format": "alpaca"}}, files={"rows.jsonl": pricer_jsonl()},
        before=("start",),
    ),
    Case(
        "all-rows-invalid", "Data", "no row has an assistant answer", "01_data",
        "no usable rows left in '{dir}/rows.jsonl': all 20 dropped (no_assistant_turn (20)) — check data.format "
        "and data.role_map (which role is the assistant?){…}",
        config={"data": {"path": "{dir}/rows.jsonl"}}, files={"rows.jsonl": NO_ANSWERS}, before=("start",),
    ),
    Case(
        "some-rows-invalid", "Data", "a few rows with an unknown role (dropped, reported)", "01_data",
        "Kept 38 of 40 rows; dropped 2 (unknown_role 2)", exit=0,
        config={"data": {"path": "{dir}/rows.jsonl"}},
        files={"rows.jsonl": pricer_jsonl(roles={2: "narrator", 5: "narrator"})}, before=("start",),
    ),
    Case(
        "some-rows-too-long", "Data", "a few prompts longer than model.max_length (dropped, reported)", "01_data",
        "Kept 38 of 40 rows; dropped 2 (too_long 2)", exit=0,
        config={"data": {"path": "{dir}/rows.jsonl"}}, files={"rows.jsonl": pricer_jsonl(long_rows=(4, 9))},
        before=("start",),
    ),
    Case(
        "all-rows-too-long", "Data", "every prompt longer than model.max_length", "01_data",
        "no usable rows left in '{dir}/rows.jsonl': all 20 dropped (too_long (20)) — raise model.max_length or set "
        "data.on_too_long: truncate{…}",
        config={"data": {"path": "{dir}/rows.jsonl"}},
        files={"rows.jsonl": pricer_jsonl(20, long_rows=tuple(range(1, 21)))}, before=("start",),
    ),
    # ------------------------------------------------------------------ Model
    Case(
        "model-offline", "Model", "a hub model that is not cached, with HF_HUB_OFFLINE set", "00_setup",
        "model.name 'someorg/no-such-model' is not in this machine's Hugging Face cache and HF_HUB_OFFLINE is set "
        "— unset HF_HUB_OFFLINE to download it, or check the spelling",
        config={"model": {"name": "someorg/no-such-model"}}, env={"HF_HUB_OFFLINE": "1"},
    ),
    Case(
        "model-hub-unreachable", "Model", "a hub model while the Hub cannot be reached", "00_setup",
        "model.name 'someorg/no-such-model' is not on this machine and the Hugging Face Hub cannot be reached to "
        "fetch the model — check the internet connection (on Colab: Runtime → Restart session), or download it and "
        "give its local path",
        config={"model": {"name": "someorg/no-such-model"}},
        env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": ""},  # a closed local port: refused at once
    ),
    Case(
        "model-folder-missing", "Model", "a model folder that does not exist", "00_setup",
        "model.name './models/mine' is not a folder on this machine and not a hub id (owner/name) — check the "
        "path, or use a hub id such as unsloth/Llama-3.2-1B-Instruct",
        config={"model": {"name": "./models/mine"}},
    ),
    Case(
        "model-folder-not-a-model", "Model", "a folder without config.json", "00_setup",
        "model.name folder '{dir}/mymodel' has no config.json — point it at a folder written by save_pretrained "
        "(the one that holds config.json and the weights)",
        config={"model": {"name": "{dir}/mymodel"}}, files={"mymodel/notes.txt": "weights go here\n"},
    ),
    Case(
        "model-embedded-typo", "Model", "a misspelt built-in model name", "00_setup",
        "model.name 'embedded:tiny-lama' is not a built-in name — the embedded one is 'embedded:tiny-llama'",
        config={"model": {"name": "embedded:tiny-lama"}},
    ),
    Case(
        "target-module-typo", "Model", "lora.target_modules naming a layer the model lacks", "00_setup",
        "lora.target_modules has 'v_prj', which is no layer of 'embedded:tiny-llama' → did you mean 'v_proj'? — "
        "use all-linear, or names from: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj",
        config={"lora": {"target_modules": ["q_proj", "v_prj"]}},
    ),
    Case(
        "target-module-pattern", "Model", "a lora.target_modules pattern that matches nothing", "00_setup",
        "lora.target_modules pattern .*attention\\.query (matched against full layer names) matches no layer "
        "of 'embedded:tiny-llama' — use all-linear, or a list of names; its linear layers are down_proj, gate_proj, "
        "k_proj, o_proj, q_proj, up_proj, v_proj",
        config={"lora": {"target_modules": ".*attention\\.query"}},
    ),
    Case(
        "remote-code-as-text", "Model", "trust_remote_code written as text", "00_setup",
        "model.trust_remote_code must be true or false, got the text 'yes' — write true without quotes",
        config={"model": {"trust_remote_code": "yes"}},
    ),
    Case(
        "remote-code-on", "Model", "trust_remote_code: true (allowed, with a warning)", "00_setup",
        "⚠ model.trust_remote_code is true: loading 'embedded:tiny-llama' runs Python code from its repository on "
        "this machine — keep it only for repositories you trust",
        config={"model": {"trust_remote_code": True}}, exit=0,
    ),
    Case(
        "no-chat-template", "Model", "a tokenizer without a chat template (continues with ChatML)", "01_data",
        "The tokenizer of '{dir}/plain-model' has no chat template: using the lab's default ChatML template (set "
        "model.tokenizer to a chat model's tokenizer to use its own).",
        config={"model": {"name": "{dir}/plain-model"}, "data": {"limit": 40}},
        files={"plain-model": "@tiny-llama-without-chat-template"}, before=("start",), exit=0,
    ),
    # ------------------------------------------------------------------ Runs (one trained run, shared)
    Case(
        "changed-max-length", "Runs", "re-run a trained run with another model.max_length", "00_setup",
        "run 'trained' already has training results made with other settings (model.max_length: 128 → 256) — set "
        "a new run_name to keep both, or restart this run explicitly (RESTART = True in 02_train moves the old "
        "results to previous-<time>/; nothing is deleted)",
        config={"model": {"max_length": 256}}, trained=True,
    ),
    Case(
        "changed-lora-shape", "Runs", "re-run a trained run with another LoRA rank", "00_setup",
        "run 'trained' already has training results made with other settings (lora.r: 32 → 8) — set a new run_name "
        "to keep both, or restart this run explicitly (RESTART = True in 02_train moves the old results to "
        "previous-<time>/; nothing is deleted)",
        config={"lora": {"r": 8}}, trained=True,
    ),
    Case(
        "changed-base-model", "Runs", "re-run a trained run with another base model", "02_train",
        "run 'trained' already has training results made with other settings (model.name: 'embedded:tiny-llama' → "
        "'{dir}/other-model') — set a new run_name to keep both, or restart this run explicitly (RESTART = True in "
        "02_train moves the old results to previous-<time>/; nothing is deleted)",
        config={"model": {"name": "{dir}/other-model"}}, files={"other-model": "@tiny-llama-without-chat-template"},
        trained=True,
    ),
    Case(
        "changed-data", "Runs", "re-run a trained run with other data", "01_data",
        "run 'trained' already has training results made with other settings (data.path: '{dir}/rows.jsonl' → "
        "'{dir}/other.jsonl') — set a new run_name to keep both, or restart this run explicitly (RESTART = True in "
        "02_train moves the old results to previous-<time>/; nothing is deleted)",
        config={"data": {"path": "{dir}/other.jsonl"}}, files={"other.jsonl": pricer_jsonl(50)}, trained=True,
    ),
    Case(
        "full-before-save", "Runs", "Drive nearly full when training resumes", "02_train",
        "only {…} GiB free on {dir}/runs (checkpoint.min_free_gib: 1e+06) — free space (delete old runs or "
        "exports, then empty Drive's trash) or lower checkpoint.min_free_gib; nothing was written",
        config={"checkpoint": {"min_free_gib": 1e6}}, trained=True,
    ),
    Case(
        "full-before-export", "Runs", "Drive nearly full before the export", "04_export",
        "only {…} GiB free on {dir}/runs (checkpoint.min_free_gib: 1e+06) — free space (delete old runs or "
        "exports, then empty Drive's trash) or lower checkpoint.min_free_gib; nothing was written",
        config={"checkpoint": {"min_free_gib": 1e6}}, trained=True,
    ),
    Case(
        "finished-run-rerun", "Runs", "02_train run again on a run that reached train.max_steps", "02_train",
        "Run trained is finished: adapter at {dir}/runs/trained/adapter, step 4 of 4 — raise train.max_steps (or "
        "num_train_epochs) to continue",
        config={}, trained=True, exit=0,
    ),
    Case(
        "processed-data-damaged", "Runs", "a processed-data .arrow file cut short (02_train)", "02_train",
        "the processed data in {dir}/runs/trained/data/dataset is damaged ({…}) — run 01_data again to make it anew",
        config={}, files={"runs/trained/data/dataset/train/data-00000-of-00001.arrow": "@truncate:2000"},
        trained=True,
    ),
    Case(
        "second-trainer", "Runs", "a second 02_train on a run another runtime is training (two tabs)", "02_train",
        "run folder 'second-trainer' is being trained by another process (host other-colab-vm, pid 4242, started "
        "2026-01-01 00:00:00 UTC, last heartbeat {…}) — two trainers would overwrite each other's checkpoints: stop "
        "the other notebook's training cell (or close that tab); if that runtime is gone, run this again after 3 min "
        "without its heartbeat and the lock is taken over",
        config={"data": {"limit": 60}}, files={"runs/second-trainer/trainer.lock": OTHER_TRAINER},
        before=("start", "01_data"),
    ),
    Case(
        "older-run-format", "Runs", "a run folder written by an older version (run.json format 0)", "00_setup",
        "run folder {dir}/runs/old comes from an older qlora-lab (0.0.9, run format 0 < 1) — use a new run_name "
        "(this folder is left as it is), or install qlora-lab 0.0.9 to finish it",
        config="run_name: old\n",
        files={"runs/old/run.json": '{"format": 0, "qlora_lab": "0.0.9"}', "runs/old/config.yaml": "run_name: old\n"},
    ),
    Case(
        "newer-run-format", "Runs", "a run folder written by a newer version", "00_setup",
        "run folder {dir}/runs/new was written by a newer qlora-lab (9.0.0, run format 99 > 1) — upgrade the package "
        "(re-run the setup cell after a fresh runtime) or use a new run_name",
        config="run_name: new\n",
        files={"runs/new/run.json": '{"format": 99, "qlora_lab": "9.0.0"}', "runs/new/config.yaml": "run_name: new\n"},
    ),
    Case(
        "run-json-damaged", "Runs", "a damaged run.json", "00_setup",
        "{dir}/runs/r/run.json is damaged — restore it from Drive's version history (right-click → Manage "
        "versions) or use a new run_name",
        config="run_name: r\n", files={"runs/r/run.json": '{"format": 1', "runs/r/config.yaml": "run_name: r\n"},
    ),
    Case(
        "run-json-missing", "Runs", "a run folder with config.yaml but no run.json", "00_setup",
        "run folder {dir}/runs/r has a config.yaml but no run.json, so it was not made by this qlora-lab (or "
        "run.json was deleted) — use a new run_name; this folder is left as it is",
        config="run_name: r\n", files={"runs/r/config.yaml": "run_name: r\n"},
    ),
    Case(
        "run-json-lost", "Runs", "a trained run folder whose run.json is gone (Drive sync, a stray delete)", "00_setup",
        "run folder {dir}/runs/r has checkpoints made by qlora-lab but its run.json is gone — restore run.json from "
        "Drive's trash or version history (right-click → Manage versions), or use a new run_name; this folder is "
        "left as it is",
        config="run_name: r\n", files={"runs/r/config.yaml": "run_name: r\n",
                                       "runs/r/checkpoints/checkpoint-2/lab_manifest.json": "{}"},
    ),
    Case(
        "saved-config-damaged", "Runs", "the run's saved config.yaml no longer parses", "01_data",
        "the run's saved config is unusable (config file '{dir}/runs/r/config.yaml': YAML syntax error at line 3, "
        "column 1: expected ',' or '}', but got '<stream end>' (while parsing a flow mapping that starts at line 2, "
        "column 7) — a { … } mapping is not closed or lacks a comma — check the braces on that line) — restore "
        "config.yaml from Drive's version history (right-click → Manage versions), or use a new run_name",
        config="run_name: r\n",
        files={"runs/r/run.json": '{"format": 1, "qlora_lab": "0.1.0"}', "runs/r/config.yaml": "run_name: r\nlora: {r: 8\n"},
    ),
    Case(
        "results-without-config", "Runs", "checkpoints in a run folder whose config.yaml is gone", "02_train",
        "run folder {dir}/runs/r has training results but no config.yaml — restore config.yaml from Drive's "
        "version history (right-click → Manage versions), or use a new run_name; this folder is left as it is",
        config="run_name: r\n",
        files={"runs/r/run.json": '{"format": 1, "qlora_lab": "0.1.0"}', "runs/r/checkpoints/checkpoint-2/x": "x"},
    ),
    Case(
        "train-before-data", "Runs", "02_train run before 01_data", "02_train",
        "no processed data in {dir}/runs/train-before-data/data — run 01_data first",
        config={}, before=("start",),
    ),
    Case(
        "evaluate-before-training", "Runs", "03_evaluate run before 02_train", "03_evaluate",
        "no adapter in {dir}/runs/evaluate-before-training/adapter — run 02_train to the end first",
        config={}, before=("start",),
    ),
    Case(
        "export-before-training", "Runs", "04_export run before 02_train", "04_export",
        "no adapter in {dir}/runs/export-before-training/adapter — run 02_train{…}first",
        config={}, before=("start",),
    ),
    Case(
        "data-edited-after-training", "Runs", "the data file edited in place after training", "01_data",
        "{…}'trained'{…}data{…}run_name{…}",
        config={}, files={"rows.jsonl": pricer_jsonl(30)}, trained=True,
        owner="data.py (01_data re-processes changed data over a run that already has checkpoints)",
    ),
]

# The shared trained run of the "Runs" cases: a local data file, four steps, every notebook.
TRAINED = {
    "run_name": "trained",
    "model": {"max_length": 128},
    "data": {"path": "{dir}/rows.jsonl"},
    "train": {"max_steps": 4, "save_steps": 2, "learning_rate": 1e-3, "logging_steps": 1,
              "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1},
    "eval": {"num_generations": 2, "max_new_tokens": 8},
    # adapter, model card and a (dry-run) push read the token; merging and GGUF do not, and take longest
    "export": {"merged": False, "gguf": [], "push_repo": "lab-tests/secret-scan", "push": ["adapter"]},
}
TRAINED_DATA = pricer_jsonl(60)


# ----------------------------------------------------------------------------------------- templates


def pattern(template: str, folder: str) -> re.Pattern:
    """Return the regex a message template stands for, with {dir} = folder and {…} = any text."""
    parts = re.split(r"(\{dir\}|\{…\})", template)
    out = []
    for part in parts:
        if part == "{dir}":
            out.append(re.escape(folder))
        elif part == "{…}":
            out.append(".*?")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out), re.S)


def config_text(case: Case, folder: str, base: dict | None = None) -> str | None:
    """Return the LAB_CONFIG text of a case (BASE or `base` merged with its config), or None."""
    import yaml

    if case.config is None:
        return None
    if isinstance(case.config, str):
        return case.config.replace("{dir}", folder)
    cfg = json.loads(json.dumps(base or {**BASE, "run_name": case.id}))
    for section, values in case.config.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section] = {**cfg[section], **values}
        else:
            cfg[section] = values
    text = yaml.safe_dump(cfg, sort_keys=False)
    return text.replace("{dir}", folder)


# ---------------------------------------------------------------------------------------------- doc


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_doc() -> str:
    """Return docs/troubleshooting.md: every case, grouped, with its message and the notebook that shows it."""
    lines = [
        "# Troubleshooting: every message the lab gives",
        "",
        "Generated by `python tests/error_cases.py` from `tests/error_cases.py`; `tests/test_errors.py` runs",
        "each row through the notebooks (as scripts) and checks the message, the exit status (2 = stopped,",
        "0 = continued) and that nothing already in the run folder changed. `<tmp>` is the folder the case ran",
        "in, `…` any text. Rows marked *planned* wait for a fix in the module named.",
        "",
        "Checks run before anything is loaded or written: the config (types and ranges from the libraries'",
        "own dataclasses, unknown keys with the nearest valid one), the runs folder, Drive, data and model",
        "paths, the GPU a profile needs, and free space. Any other failure still ends with one `✗` line.",
        "",
    ]
    groups: dict[str, list[Case]] = {}
    for case in CASES:
        groups.setdefault(case.group, []).append(case)
    for group, cases in groups.items():
        lines += [f"## {group}", "", "| wrong input | notebook | outcome | message |", "|---|---|---|---|"]
        for c in cases:
            outcome = "stops (exit 2)" if c.exit else "continues"
            if c.owner:
                outcome += f"; *planned: {c.owner}*"
            shown = c.message.replace("{dir}", "<tmp>").replace("{…}", "…")
            prefix = "✗ " if c.exit else ""
            lines.append(f"| {_cell(c.bad)} | {c.script} | {_cell(outcome)} | `` {_cell(prefix + shown)} `` |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(render_doc())
    print(f"Wrote {DOC.relative_to(REPO)} ({len(CASES)} cases)")
