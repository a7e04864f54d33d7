# hcd under Snakemake: `snakemake --cores all`.
#
# Every rule takes its command, inputs, outputs and params from hcd/pipeline/table.py,
# the same stage table dvc.yaml is rendered from, so both engines run identical
# command lines on identical files (tests/test_pipeline.py checks it, and that
# this file has exactly one rule per stage). Configuration is params.yaml,
# validated before any rule; the keys each stage reads are passed as `params:`,
# so changing one reruns only the stages that read it. profiles/default/ makes
# Snakemake compare checksums, so mtimes reset by `dvc checkout` rerun nothing.
#
# `snakemake --lint` advises a conda environment or container per rule: hcd installs with
# pip into one environment (pyproject.toml), the same for every rule, so none is declared.
# Each rule's output also goes to logs/<stage>[/<backbone>].log.
#
# Per-backbone rules (train, predict, explain) use the {backbone} wildcard over
# params.yaml's `backbones`; they ask for resources gpu=1, so
# `snakemake --cores all --resources gpu=1` runs one at a time on one GPU, and
# `--resources gpu=4` four at once, each on a GPU of its own (each job claims a
# free one before CUDA starts: hcd.runtime.gpuslots).

import re
import sys

sys.path.insert(0, workflow.basedir)

from hcd.errors import HcdError
from hcd.pipeline.freshness import pipeline_files, reveal_hidden_edits
from hcd.pipeline.params import load_params
from hcd.pipeline.table import SNAKEMAKE_LOG_SUFFIX, STAGES, final_outputs, report_annotations, snakemake_command, snakemake_inputs, snakemake_mem_mb, snakemake_params, wildcard

try:
    PARAMS = load_params("params.yaml")
except HcdError as err:
    raise WorkflowError(f"hcd: {err}") from None

S = {stage.name: stage for stage in STAGES}
BACKBONES = PARAMS.backbones

# A file rewritten in place with its old mtime put back looks unchanged to Snakemake:
# hcd finds it by its ctime and content and sets its mtime to now (hcd.pipeline.freshness),
# before the DAG is built, and records what the jobs wrote when the run ends (below).
def record_contents():
    # Only the workflow main process: the jobs of a cluster run each read this Snakefile too
    if workflow.is_main_process:
        for path in reveal_hidden_edits(pipeline_files(BACKBONES)):
            print(f"hcd: {path}: content changed with its mtime kept; mtime set to now, so what was made from it reruns", file=sys.stderr)


record_contents()


def outputs(name):
    # Outputs of a stage: folders marked directory(), and those the table puts on the report
    # page wrapped in report() with their caption and category (hcd.pipeline.table.report_annotations).
    stage = S[name]
    notes = report_annotations(stage)
    out = []
    for o in stage.outputs:
        path = directory(wildcard(o)) if o in stage.dirs else wildcard(o)
        out.append(report(path, **notes[o]) if o in notes else path)
    return out


def threads(name):
    return workflow.cores if S[name].threads == "all" else S[name].threads


wildcard_constraints:
    backbone="|".join(map(re.escape, BACKBONES)),


rule all:
    default_target: True
    input:
        final_outputs(BACKBONES),


# One rule per stage of the table, defined in a loop (Snakemake's procedural rule
# definition): check, download, scan, split, stats, train, predict, explain, ensemble, metrics, export.
#
# The command goes through params (evaluated when the rule is defined) and the shell
# directive only formats it: the shell directive's own expression is evaluated when a
# job runs, after the loop has ended, so it would see the last stage.
for _stage in STAGES:

    rule:
        name:
            _stage.name
        input:
            snakemake_inputs(_stage, BACKBONES),
        output:
            outputs(_stage.name),
        params:
            **snakemake_params(PARAMS, _stage),
            hcd_cmd=snakemake_command(_stage),
        log:
            wildcard(_stage.log),
        threads: threads(_stage.name)
        resources:
            mem_mb=snakemake_mem_mb(_stage),
            **_stage.resources,
        shell:
            "{params.hcd_cmd}" + SNAKEMAKE_LOG_SUFFIX


# `snakemake --report report.html`: the figures of report/ and explain/ on one page
report: "workflow/report/workflow.rst"


onsuccess:
    record_contents()


onerror:
    record_contents()
