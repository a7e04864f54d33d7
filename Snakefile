# hcd under Snakemake: `snakemake --cores all`.
#
# The rules are built from hcd/pipeline.py — the same stage table dvc.yaml is
# rendered from — so both engines run identical command lines on identical
# inputs and outputs. Configuration is params.yaml (validated before any rule);
# the keys each stage reads are passed as `params:`, so changing one reruns only
# the stages that read it. profiles/default/config.yaml makes Snakemake compare
# checksums, so mtimes reset by `dvc checkout` cause no spurious reruns.

import sys

sys.path.insert(0, workflow.basedir)

from hcd.errors import HcdError
from hcd.params import load_params
from hcd.pipeline import STAGES, final_outputs, snakemake_params

try:
    PARAMS = load_params("params.yaml")
except HcdError as err:
    raise WorkflowError(f"hcd: {err}") from None


rule all:
    default_target: True
    input:
        final_outputs(),


for stage in STAGES:

    rule:
        name:
            stage.name
        input:
            stage.inputs,
        output:
            stage.outputs,
        params:
            **snakemake_params(PARAMS, stage),
        resources:
            **stage.resources,
        shell:
            stage.cmd
