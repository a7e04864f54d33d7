# hcd under Snakemake: `snakemake --cores all`.
#
# Every rule takes its command, inputs, outputs and params from hcd/pipeline.py,
# the same stage table dvc.yaml is rendered from, so both engines run identical
# command lines on identical files (tests/test_pipeline.py checks it, and that
# this file has exactly one rule per stage). Configuration is params.yaml,
# validated before any rule; the keys each stage reads are passed as `params:`,
# so changing one reruns only the stages that read it. profiles/default/ makes
# Snakemake compare checksums, so mtimes reset by `dvc checkout` rerun nothing.

import sys

sys.path.insert(0, workflow.basedir)

from hcd.errors import HcdError
from hcd.params import load_params
from hcd.pipeline import STAGES, final_outputs, snakemake_params

try:
    PARAMS = load_params("params.yaml")
except HcdError as err:
    raise WorkflowError(f"hcd: {err}") from None

S = {stage.name: stage for stage in STAGES}


rule all:
    default_target: True
    input:
        final_outputs(),


rule download:
    input:
        S["download"].inputs,
    output:
        S["download"].outputs,
    params:
        **snakemake_params(PARAMS, S["download"]),
    shell:
        S["download"].cmd


rule scan:
    input:
        S["scan"].inputs,
    output:
        S["scan"].outputs,
    params:
        **snakemake_params(PARAMS, S["scan"]),
    shell:
        S["scan"].cmd


rule split:
    input:
        S["split"].inputs,
    output:
        S["split"].outputs,
    params:
        **snakemake_params(PARAMS, S["split"]),
    shell:
        S["split"].cmd


rule stats:
    input:
        S["stats"].inputs,
    output:
        S["stats"].outputs,
    params:
        **snakemake_params(PARAMS, S["stats"]),
    shell:
        S["stats"].cmd
