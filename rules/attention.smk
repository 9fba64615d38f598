# CHIEF over CTransPath's features, once per CTransPath grid (`chief`, `chief@0.5mpp`, ...).
rule attention_chief:
    input:
        features=lambda wildcards: "results/features/{selection}/batches/{batch}.tsv".format(
            batch=wildcards.batch, **selection_fields(instance_suffix(wildcards.chief))
        ),
    output:
        manifest="results/attention/{chief}/batches/{batch}.tsv",
    log:
        "logs/attention/{chief}/{batch}.log",
    benchmark:
        "benchmarks/attention/{chief}/{batch}.tsv"
    wildcard_constraints:
        chief=alternatives(CHIEF_NAMES),
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        code=stage_code_digest("attention_chief", model_files(["chief"])),
        slides=batch_params(
            features="results/features/{selection}/{slide}.h5",
            output="results/attention/{chief}/{slide}.h5",
        ),
        model=config["models"]["chief"],
    script:
        "../scripts/attention_chief.py"
