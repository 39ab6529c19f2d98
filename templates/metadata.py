"""Flex Template metadata generated from each job's PipelineOptions, and checked against them.

    python -m templates.metadata --write   # regenerate templates/<job>/{metadata.json,main.py}
    python -m templates.metadata --check   # exit 1 and name every difference (CI runs this)
    python -m templates.metadata --list    # the registered jobs, one a line

A template's parameters are exactly the flags its job's code parses: the
argparse parser that the job's ``PipelineOptions`` subclasses populate through
``_add_argparse_args`` (names, help, defaults, choices, types), minus the flags a
registry entry excludes with a reason. Beam's own options (``--runner``,
``--project``, ``--temp_location``, ...) are never template parameters: Dataflow
supplies them at launch.

The job's option classes are found, not listed: every ``PipelineOptions``
subclass outside Beam that the job module defines or imports (what its ``run()``
can ``view_as``). So adding a template is one registry line in :data:`TEMPLATES`
plus ``--write``; a flag added to a job later fails ``--check`` (and the tests)
until the metadata is regenerated.

``--check`` also refuses what the launcher cannot pass: the Flex Template
launcher starts ``python <main.py> --name=value ...``, so a flag that takes no
value (``store_true``), takes several, is positional, or shares a name with a
Beam option cannot be a template parameter.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import re
import sys
from typing import Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple, Type

from apache_beam.options import pipeline_options as beam_options
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.options import true_or_false

TEMPLATES_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TEMPLATES_DIR)
METADATA_FILE = "metadata.json"
ENTRY_POINT_FILE = "main.py"
SHARED_OPTIONS_MODULE = "pipelines.options"
REGENERATE = "python -m templates.metadata --write"


@dataclasses.dataclass(frozen=True)
class Template:
    """One Flex Template: the job module ``pipelines.<job>`` and what its metadata leaves out.

    Attributes:
        job: module name under ``pipelines/``; also the template's directory name.
        exclude: flags the job's parser accepts but the template must not offer,
            each mapped to the reason (shown by ``--check`` when it goes stale).
        streaming: the job reads an unbounded source (sets ``metadata.streaming``).
        required: flags the job itself refuses to start without; argparse cannot
            require them, because Beam parses every imported job's options at once.
        description: defaults to the first line of the job module's docstring.
    """

    job: str
    exclude: Mapping[str, str] = dataclasses.field(default_factory=dict)
    streaming: bool = False
    required: FrozenSet[str] = frozenset()
    description: Optional[str] = None

    @property
    def module(self) -> str:
        return f"pipelines.{self.job}"

    @property
    def directory(self) -> str:
        return os.path.join(TEMPLATES_DIR, self.job)


# The registry: one line per Flex Template. `--write` creates its directory;
# templates/deploy.sh builds an image and a template spec for every directory.
EMULATOR_ONLY = {
    "bigquery_endpoint": "points clients at a local BigQuery emulator; never set on Dataflow",
    "bigquery_storage_endpoint": "the emulator's Storage API port; never set on Dataflow",
}


TEMPLATES: Tuple[Template, ...] = (
    Template("batch_recommendations", exclude=EMULATOR_ONLY),
    Template("bandit_report"),
    Template("train_ranker"),
    Template("campaign_report", exclude={
        "segment_by": "campaign_report refuses it at start-up (per-segment state is "
                      "bandit_report's)"}),
    Template("streaming_refresh", streaming=True, exclude={
        **EMULATOR_ONLY,
        "max_runtime_seconds": "bounds local runs only; a Dataflow job runs until drained",
        "warehouse": "the streaming job writes BigQuery only (--streaming_dataset)",
        "staging_dir": "the streaming job stages nothing",
        "as_of": "the streaming job's reference time is each window's end",
        "sink": "the streaming job writes BigQuery only (--streaming_dataset); refused",
        "events_since": "the stream is the events after the history; refused",
        "events_until": "the stream is the events after the history; refused",
        "treatment_events_table": "treatment events come from Pub/Sub; refused"},
        required=frozenset({"events_subscription", "treatments_subscription",
                            "streaming_dataset"})),
)


@dataclasses.dataclass(frozen=True)
class Format:
    """A value format a parameter's regex enforces at launch, with an example that matches."""

    description: str
    regex: str
    example: str


RFC3339 = Format("an RFC 3339 time with its offset",
                 r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
                 r"([Zz]|[+-][0-9]{2}:[0-9]{2})$",
                 "2026-02-28T23:59:43Z")
PATH = Format("a gs:// URI or a local path: letters, digits and _ . , = @ + / -, "
              "no '..' segment",
              r"^(?!(.*/)?\.\.(/|$))"
              r"(gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/[A-Za-z0-9_.,=@+/-]*)?"
              r"|[A-Za-z0-9_.,=@+/-]+)$",
              "gs://my-bucket/segment-recs")
RUN_ID = Format("letters, digits, '_', '.' and '-' (at most 128)",
                r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$", "20260301T060000Z_daily")
ATTRIBUTES = Format("comma-separated attribute names, or empty",
                    r"^([A-Za-z_][A-Za-z0-9_]*(,[A-Za-z_][A-Za-z0-9_]*)*)?$", "make,model")
BIGQUERY_TABLE = Format("a BigQuery table, [PROJECT:]DATASET.TABLE",
                        r"^([a-z][-a-z0-9]{4,28}[a-z0-9][:.])?[A-Za-z0-9_]{1,1024}"
                        r"\.[-A-Za-z0-9_]{1,1024}$",
                        "my-project:recs.recommendations")
BIGQUERY_PROJECT = Format("a Google Cloud project id",
                          r"^([a-z][a-z0-9.-]{0,61}[a-z0-9]:)?[a-z][-a-z0-9]{4,28}[a-z0-9]$",
                          "my-project")
BIGQUERY_DATASET = Format("a BigQuery dataset, [PROJECT:]DATASET",
                          r"^([a-z][-a-z0-9]{4,28}[a-z0-9][:.])?[A-Za-z0-9_]{1,1024}$",
                          "my-project:recs")
SUBSCRIPTION = Format("a Pub/Sub subscription, projects/PROJECT/subscriptions/NAME",
                      r"^projects/[a-z][-a-z0-9]{4,28}[a-z0-9]/subscriptions/"
                      r"[A-Za-z][-A-Za-z0-9._~%+]{2,254}$",
                      "projects/my-project/subscriptions/order-events")
TOPIC = Format("a Pub/Sub topic, projects/PROJECT/topics/NAME",
               r"^projects/[a-z][-a-z0-9]{4,28}[a-z0-9]/topics/[A-Za-z][-A-Za-z0-9._~%+]{2,254}$",
               "projects/my-project/topics/recommendations")
INPUT_TABLE = Format("a table name of --input_dir (letters, digits and _), or empty",
                     r"^([A-Za-z_][A-Za-z0-9_]{0,127})?$", "events")
INTEGER = Format("an integer", r"^[-+]?[0-9]+$", "8")
BOOLEAN = Format("true or false", r"^([Tt]rue|[Ff]alse)$", "true")
NUMBER = Format("a number", r"^[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?$", "0.5")
REDIS_URL = Format("a Redis URL, redis://HOST:PORT/DB (the Memorystore instance)",
                   r"^rediss?://[A-Za-z0-9.-]+:[0-9]{1,5}(/[0-9]{1,2})?$",
                   "redis://10.0.0.3:6379/0")
KEY_PREFIX = Format("letters, digits, _ and - (at most 64)", r"^[A-Za-z0-9_-]{1,64}$", "recs")

# Formats by option name, then by name suffix; type and choices come first.
FORMAT_BY_NAME: Dict[str, Format] = {
    "as_of": RFC3339, "run_id": RUN_ID, "segment_by": ATTRIBUTES, "bandit_segment_by": ATTRIBUTES,
    "warehouse": PATH,
    "config": PATH, "history_table": INPUT_TABLE, "ranker_model": PATH,
    "bigquery_project": BIGQUERY_PROJECT,
    "serving_store": REDIS_URL, "serving_namespace": KEY_PREFIX,
}
FORMAT_BY_SUFFIX: Tuple[Tuple[str, Format], ...] = (
    ("_dir", PATH), ("_path", PATH), ("_file", PATH), ("_html", PATH), ("_location", PATH),
    ("_prefix", PATH), ("_config", PATH), ("_table", BIGQUERY_TABLE),
    ("_dataset", BIGQUERY_DATASET), ("_subscription", SUBSCRIPTION), ("_topic", TOPIC),
    ("_time", RFC3339), ("_at", RFC3339), ("_since", RFC3339), ("_until", RFC3339),
)
FORMATS: Tuple[Format, ...] = (RFC3339, PATH, RUN_ID, ATTRIBUTES, BIGQUERY_TABLE,
                               BIGQUERY_PROJECT, BIGQUERY_DATASET, SUBSCRIPTION, TOPIC,
                               INPUT_TABLE, INTEGER, NUMBER, BOOLEAN, REDIS_URL, KEY_PREFIX)

LABEL_WORDS = {"dir": "directory", "id": "ID", "html": "HTML", "num": "number of",
               "min": "minimum", "max": "maximum", "vs": "vs.", "bq": "BigQuery",
               "gcs": "Cloud Storage", "url": "URL", "sku": "SKU", "ctr": "CTR"}

# The documented shape (Dataflow API TemplateMetadata / ParameterMetadata, camelCase).
TEMPLATE_KEYS = {"name", "description", "parameters", "streaming", "supportsAtLeastOnce",
                 "supportsExactlyOnce", "defaultStreamingMode"}
PARAMETER_KEYS = {"name", "label", "helpText", "isOptional", "regexes", "paramType",
                  "customMetadata", "groupName", "parentName", "parentTriggerValues",
                  "enumOptions", "defaultValue", "hiddenUi"}
REQUIRED_PARAMETER_KEYS = ("name", "label", "helpText", "isOptional")
PARAMETER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class TemplateError(Exception):
    """A registry entry that cannot produce a template (bad module, no options, clashes)."""


# --------------------------------------------------------------------------- options

def _is_project_options(value: object) -> bool:
    return (inspect.isclass(value) and issubclass(value, PipelineOptions)
            and not value.__module__.startswith("apache_beam"))


def job_options(template: Template) -> List[Type[PipelineOptions]]:
    """The job's option classes: shared ones first, then imported, then its own."""
    try:
        module = importlib.import_module(template.module)
    except ImportError as err:
        raise TemplateError(f"{template.job}: cannot import {template.module}: {err}") from err
    found: List[Type[PipelineOptions]] = []
    for value in vars(module).values():
        if _is_project_options(value) and value not in found:
            found.append(value)
    if not found:
        raise TemplateError(f"{template.job}: {template.module} defines or imports no "
                            f"PipelineOptions subclass; the launcher's --name=value flags "
                            f"must be parsed by one")
    rank = {SHARED_OPTIONS_MODULE: 0}
    return sorted(found, key=lambda cls: rank.get(cls.__module__,
                                                  2 if cls.__module__ == template.module else 1))


def new_parser() -> argparse.ArgumentParser:
    """The parser class Beam hands to ``_add_argparse_args`` (plain argparse as a fallback)."""
    parser_class = getattr(beam_options, "_BeamArgumentParser", argparse.ArgumentParser)
    return parser_class(allow_abbrev=False, add_help=False)


def job_parser(template: Template) -> argparse.ArgumentParser:
    """The job's flags as Beam would parse them in the launcher: every option class, once."""
    parser = new_parser()
    for cls in job_options(template):
        try:
            cls._add_argparse_args(parser)  # pylint: disable=protected-access
        except argparse.ArgumentError as err:
            raise TemplateError(f"{template.job}: {cls.__module__}.{cls.__name__} declares a "
                                f"flag another of the job's option classes declares: {err}")
    return parser


def _all_subclasses(cls: type) -> List[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


def beam_flags() -> Dict[str, str]:
    """Every flag Beam's own option classes declare → the class that declares it."""
    flags: Dict[str, str] = {}
    for cls in _all_subclasses(PipelineOptions):
        if cls.__module__.startswith("apache_beam") and "_add_argparse_args" in cls.__dict__:
            parser = new_parser()
            parser.conflict_handler = "resolve"
            try:
                cls._add_argparse_args(parser)  # pylint: disable=protected-access
            except Exception:  # a Beam class we cannot introspect is not ours to check
                continue
            for action in parser._actions:  # pylint: disable=protected-access
                for flag in action.option_strings:
                    flags.setdefault(flag, cls.__name__)
    return flags


def option_actions(parser: argparse.ArgumentParser) -> List[argparse.Action]:
    """The parser's arguments in declaration order, without help actions."""
    return [a for a in parser._actions  # pylint: disable=protected-access
            if not isinstance(a, argparse._HelpAction)]  # pylint: disable=protected-access


def action_name(action: argparse.Action) -> str:
    """The parameter name: the long flag without dashes (the launcher passes --name=value)."""
    long_flags = [f for f in action.option_strings if f.startswith("--")]
    return long_flags[0][2:] if long_flags else action.dest


def parser_problems(template: Template, parser: argparse.ArgumentParser) -> List[str]:
    """Flags the launcher cannot pass as ``--name=value``, or that clash with Beam's."""
    problems = []
    reserved = beam_flags()
    for action in option_actions(parser):
        name = action_name(action)
        where = f"{template.job}: option {name!r}"
        if not action.option_strings:
            problems.append(f"{where} is positional; the launcher passes only --name=value")
            continue
        if action.nargs == 0:
            problems.append(f"{where} takes no value ({type(action).__name__}); the launcher "
                            f"passes --{name}=value, so give it a type that parses true/false")
        elif action.nargs not in (None, "?"):
            problems.append(f"{where} takes nargs={action.nargs!r}; a template parameter is "
                            f"one --{name}=value")
        if name != action.dest:
            problems.append(f"{where} stores into {action.dest!r}; name the flag after its dest")
        if not PARAMETER_NAME.match(name):
            problems.append(f"{where} is not a valid template parameter name")
        for flag in action.option_strings:
            if flag in reserved:
                problems.append(f"{where}: {flag} is also Beam's {reserved[flag]} flag")
    for name, reason in template.exclude.items():
        if name not in {action_name(a) for a in option_actions(parser)}:
            problems.append(f"{template.job}: excluded option {name!r} is no longer an option "
                            f"of the job (stale exclusion: {reason})")
    return problems


# --------------------------------------------------------------------------- metadata

def format_for(action: argparse.Action) -> Optional[Format]:
    """The value format of an option: from its choices, type, name or name suffix."""
    name = action_name(action)
    if action.choices:
        values = [str(c) for c in action.choices]
        return Format("one of " + ", ".join(values),
                      "^(" + "|".join(re.escape(v) for v in values) + ")$", values[0])
    if action.type is int:
        return INTEGER
    if action.type is float:
        return NUMBER
    if action.type is true_or_false:
        return BOOLEAN
    if name in FORMAT_BY_NAME:
        return FORMAT_BY_NAME[name]
    for suffix, fmt in FORMAT_BY_SUFFIX:
        if name.endswith(suffix):
            return fmt
    return None


def label_for(name: str) -> str:
    """``min_ratio_vs_last_run`` → ``Minimum ratio vs. last run``."""
    words = " ".join(LABEL_WORDS.get(w, w) for w in name.split("_") if w)
    return words[:1].upper() + words[1:]


def _help(action: argparse.Action) -> str:
    text = " ".join((action.help or "").split())
    if "%" in text:  # argparse's own expansion of %(default)s and friends
        params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
        text = text % {**params, "prog": ""}
    return text


def help_text_for(action: argparse.Action, fmt: Optional[Format]) -> str:
    """The option's help, then its format with an example, then its default."""
    parts = [_help(action) or f"The --{action_name(action)} option."]
    if fmt is not None and fmt not in (INTEGER, NUMBER):
        parts.append(f"Format: {fmt.description}" +
                     ("." if action.choices else f", e.g. {fmt.example}."))
    if action.default not in (None, "", argparse.SUPPRESS):
        parts.append(f"Default: {action.default}.")
    elif not action.required:
        parts.append("Optional.")
    return " ".join(p if p.endswith((".", "!", "?", ")")) else p + "." for p in parts)


def parameter_for(action: argparse.Action, required: bool = False) -> Dict[str, object]:
    """One ParameterMetadata entry, from one argparse action (``required``: the job insists)."""
    name = action_name(action)
    fmt = format_for(action)
    param: Dict[str, object] = {
        "name": name,
        "label": label_for(name),
        "helpText": help_text_for(action, fmt),
        "isOptional": not (action.required or required),
    }
    if fmt is not None:
        param["regexes"] = [fmt.regex]
    if action.choices:
        param["paramType"] = "ENUM"
        param["enumOptions"] = [{"value": str(c)} for c in action.choices]
    if action.default not in (None, "", argparse.SUPPRESS):
        param["defaultValue"] = str(action.default)
    return param


def describe(template: Template) -> str:
    """The template's description: the registry's, else the module docstring's first line."""
    if template.description:
        return template.description
    doc = inspect.getdoc(importlib.import_module(template.module)) or ""
    first = doc.strip().splitlines()[0] if doc.strip() else ""
    if not first:
        raise TemplateError(f"{template.job}: {template.module} has no docstring; give the "
                            f"registry entry a description")
    return first


def template_name(template: Template) -> str:
    return "segment-recs-" + template.job.replace("_", "-")


def build_metadata(template: Template,
                   parser: Optional[argparse.ArgumentParser] = None) -> Dict[str, object]:
    """The metadata.json content for a template, from its job's options."""
    parser = parser if parser is not None else job_parser(template)
    actions = option_actions(parser)
    unknown = set(template.required) - {action_name(a) for a in actions}
    if unknown:
        raise TemplateError(f"{template.job}: required flags it does not have: "
                            f"{', '.join(sorted(unknown))}")
    parameters = [parameter_for(a, action_name(a) in template.required) for a in actions
                  if action_name(a) not in template.exclude]
    return {
        "name": template_name(template),
        "description": describe(template),
        "streaming": template.streaming,
        "parameters": parameters,
    }


def entry_point_source(template: Template) -> str:
    """The main.py the launcher runs (FLEX_TEMPLATE_PYTHON_PY_FILE)."""
    return (
        f'"""Flex Template entry point of {template.module} (FLEX_TEMPLATE_PYTHON_PY_FILE).\n\n'
        f'Generated by `{REGENERATE}`; do not edit. The launcher runs\n'
        f'`python main.py --name=value ... --runner=DataflowRunner ...`; the job\'s main()\n'
        f'parses the template parameters and Beam\'s options and sets the exit status.\n'
        f'"""\n'
        f'from {template.module} import main\n'
        f'\n'
        f'if __name__ == "__main__":\n'
        f'    main()\n')


def render(metadata: Mapping[str, object]) -> str:
    """metadata.json text: stable key order, UTF-8, trailing newline."""
    return json.dumps(metadata, indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------- checks

def shape_problems(metadata: object, where: str = "metadata") -> List[str]:
    """Problems with the documented shape of a metadata.json document."""
    if not isinstance(metadata, dict):
        return [f"{where}: top level must be an object"]
    problems = [f"{where}: unknown key {k!r}" for k in sorted(set(metadata) - TEMPLATE_KEYS)]
    for key in ("name", "description"):
        if not isinstance(metadata.get(key), str) or not metadata.get(key):
            problems.append(f"{where}: {key!r} must be a non-empty string")
    if "streaming" in metadata and not isinstance(metadata["streaming"], bool):
        problems.append(f"{where}: 'streaming' must be true or false")
    params = metadata.get("parameters")
    if not isinstance(params, list):
        return problems + [f"{where}: 'parameters' must be a list"]
    seen = set()
    for i, param in enumerate(params):
        at = f"{where}: parameters[{i}]"
        if not isinstance(param, dict):
            problems.append(f"{at} must be an object")
            continue
        at = f"{where}: parameter {param.get('name', i)!r}"
        problems += [f"{at}: unknown key {k!r}" for k in sorted(set(param) - PARAMETER_KEYS)]
        for key in REQUIRED_PARAMETER_KEYS:
            if key not in param:
                problems.append(f"{at}: missing {key!r}")
        for key in ("name", "label", "helpText"):
            if key in param and (not isinstance(param[key], str) or not param[key]):
                problems.append(f"{at}: {key!r} must be a non-empty string")
        if "isOptional" in param and not isinstance(param["isOptional"], bool):
            problems.append(f"{at}: 'isOptional' must be true or false")
        name = param.get("name")
        if isinstance(name, str):
            if not PARAMETER_NAME.match(name):
                problems.append(f"{at}: name must match {PARAMETER_NAME.pattern}")
            if name in seen:
                problems.append(f"{at}: listed twice")
            seen.add(name)
        regexes = param.get("regexes", [])
        if not isinstance(regexes, list) or not all(isinstance(r, str) for r in regexes):
            problems.append(f"{at}: 'regexes' must be a list of strings")
            continue
        for regex in regexes:
            try:
                re.compile(regex)
            except re.error as err:
                problems.append(f"{at}: regex {regex!r} does not compile: {err}")
                continue
            default = param.get("defaultValue")
            if isinstance(default, str) and not re.fullmatch(regex, default):
                problems.append(f"{at}: its default {default!r} fails its own regex {regex!r}")
    return problems


def check_metadata(template: Template, metadata: object,
                   parser: Optional[argparse.ArgumentParser] = None) -> List[str]:
    """Every difference between a metadata document and the job's options; [] when in step.

    ``parser`` defaults to :func:`job_parser`; tests pass a modified copy to show
    that a new option without metadata is reported.
    """
    where = os.path.join("templates", template.job, METADATA_FILE)
    parser = parser if parser is not None else job_parser(template)
    problems = parser_problems(template, parser) + shape_problems(metadata, where)
    if not isinstance(metadata, dict) or not isinstance(metadata.get("parameters"), list):
        return problems
    expected = build_metadata(template, parser)
    want = {p["name"]: p for p in expected["parameters"]}
    have = {p.get("name"): p for p in metadata["parameters"] if isinstance(p, dict)}
    for name in want:
        if name not in have:
            problems.append(f"{template.job}: option --{name} has no parameter in {where}; "
                            f"run `{REGENERATE}`")
    for name in have:
        if name not in want:
            why = (f"it is excluded: {template.exclude[name]}" if name in template.exclude
                   else "it is not an option of the job")
            problems.append(f"{template.job}: parameter {name!r} in {where} must go; {why}")
    for name in want.keys() & have.keys():
        for key in sorted(want[name].keys() | have[name].keys()):
            if want[name].get(key) != have[name].get(key):
                problems.append(f"{template.job}: parameter {name!r} field {key!r} is "
                                f"{have[name].get(key)!r} in {where} but the options give "
                                f"{want[name].get(key)!r}; run `{REGENERATE}`")
    if [n for n in have if n in want] != [n for n in want if n in have]:
        problems.append(f"{template.job}: parameters in {where} are out of order; "
                        f"run `{REGENERATE}`")
    for key in ("name", "description", "streaming"):
        if metadata.get(key) != expected[key]:
            problems.append(f"{template.job}: {key!r} is {metadata.get(key)!r} in {where} "
                            f"but should be {expected[key]!r}; run `{REGENERATE}`")
    return problems


def read_metadata(template: Template, root: str = TEMPLATES_DIR) -> object:
    with open(os.path.join(root, template.job, METADATA_FILE), encoding="utf-8") as handle:
        return json.load(handle)


def check_all(templates: Sequence[Template] = TEMPLATES, root: str = TEMPLATES_DIR) -> List[str]:
    """Every problem across the registry and the template directories on disk."""
    problems: List[str] = []
    for template in templates:
        directory = os.path.join(root, template.job)
        try:
            metadata = read_metadata(template, root)
        except FileNotFoundError:
            problems.append(f"{template.job}: no {os.path.relpath(directory, REPO_ROOT)}/"
                            f"{METADATA_FILE}; "
                            f"run `{REGENERATE}`")
            continue
        except json.JSONDecodeError as err:
            problems.append(f"{template.job}: {METADATA_FILE} is not valid JSON: {err}")
            continue
        try:
            problems += check_metadata(template, metadata)
        except TemplateError as err:
            problems.append(str(err))
            continue
        entry = os.path.join(directory, ENTRY_POINT_FILE)
        try:
            with open(entry, encoding="utf-8") as handle:
                current = handle.read()
        except FileNotFoundError:
            current = None
        if current != entry_point_source(template):
            problems.append(f"{template.job}: {os.path.relpath(entry, REPO_ROOT)} is missing or "
                            f"edited; run `{REGENERATE}`")
        if not callable(getattr(importlib.import_module(template.module), "main", None)):
            problems.append(f"{template.job}: {template.module} has no main() for the "
                            f"entry point to call")
    registered = {t.job for t in templates}
    for name in sorted(os.listdir(root)):
        if (os.path.isfile(os.path.join(root, name, METADATA_FILE))
                and name not in registered):
            problems.append(f"templates/{name}/ has a {METADATA_FILE} but no registry entry "
                            f"in templates/metadata.py (deploy.sh would build it)")
    return problems


def write_all(templates: Sequence[Template] = TEMPLATES, root: str = TEMPLATES_DIR) -> List[str]:
    """(Re)write every template's metadata.json and main.py; returns the files changed."""
    changed = []
    for template in templates:
        metadata = build_metadata(template)
        problems = parser_problems(template, job_parser(template)) + shape_problems(metadata)
        if problems:
            raise TemplateError("\n".join(problems))
        directory = os.path.join(root, template.job)
        os.makedirs(directory, exist_ok=True)
        for name, text in ((METADATA_FILE, render(metadata)),
                           (ENTRY_POINT_FILE, entry_point_source(template))):
            path = os.path.join(directory, name)
            try:
                with open(path, encoding="utf-8") as handle:
                    if handle.read() == text:
                        continue
            except FileNotFoundError:
                pass
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text)
            changed.append(os.path.relpath(path, REPO_ROOT))
    return changed


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m templates.metadata",
                                     description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true",
                      help="Regenerate templates/<job>/metadata.json and main.py.")
    mode.add_argument("--check", action="store_true",
                      help="Exit 1 if any template differs from its job's options.")
    mode.add_argument("--list", action="store_true", help="Print the registered jobs.")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(t.job for t in TEMPLATES))
        return 0
    if args.write:
        try:
            changed = write_all()
        except TemplateError as err:
            print(f"cannot write templates:\n{err}", file=sys.stderr)
            return 1
        print("\n".join(f"wrote {path}" for path in changed) or "templates up to date")
        return 0
    try:
        problems = check_all()
    except TemplateError as err:
        problems = [str(err)]
    if problems:
        print(f"{len(problems)} template problem(s):", file=sys.stderr)
        print("\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        return 1
    print(f"{len(TEMPLATES)} templates match their jobs' options: "
          + ", ".join(t.job for t in TEMPLATES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
