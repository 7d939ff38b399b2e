rule fig1a:
    """Figure 1a: LDS of the white-box methods with 95% CIs."""
    input:
        f"results/{EXP}/lds.csv",
    output:
        report(
            f"results/{EXP}/fig1a.pdf",
            caption="../report/fig1a.rst",
            category="Figures",
            labels={"figure": "1a"},
        ),
    log:
        f"results/{EXP}/logs/fig1a.log",
    params:
        methods=fig1a_methods,
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/figures.py"


rule fig1b:
    """Figure 1b: LDS of the black-box objectives (Table 2) beside the white-box ones."""
    input:
        f"results/{EXP}/lds.csv",
    output:
        report(
            f"results/{EXP}/fig1b.pdf",
            caption="../report/fig1b.rst",
            category="Figures",
            labels={"figure": "1b"},
        ),
    log:
        f"results/{EXP}/logs/fig1b.log",
    params:
        white=WHITE_BOX,
        black=BLACK_BOX,
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/figures.py"


rule table3:
    """Table 3: correlation versus covariance for the three variants."""
    input:
        f"results/{EXP}/lds.csv",
    output:
        md=report(
            f"results/{EXP}/table3.md",
            caption="../report/table3.rst",
            category="Tables",
            labels={"table": "3"},
        ),
        csv=f"results/{EXP}/table3.csv",
    log:
        f"results/{EXP}/logs/table3.log",
    params:
        variants=WHITE_BOX,
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/figures.py"


rule fig6:
    """Figure 6: LDS against K with the fitted y = a exp(-b K) + c."""
    input:
        f"results/{EXP}/lds/k_curve/{figure_variant()}.csv",
        config=EFFECTIVE_CONFIG,
    output:
        report(
            f"results/{EXP}/fig6.pdf",
            caption="../report/fig6.rst",
            category="Figures",
            labels={"figure": "6"},
        ),
    log:
        f"results/{EXP}/logs/fig6.log",
    params:
        label=figure_variant(),
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/figures.py"


rule fig5:
    """Figure 5: a query image with its most positive and negative training images."""
    input:
        unpack(fig5_inputs),
    output:
        report(
            f"results/{EXP}/fig5.pdf",
            caption="../report/fig5.rst",
            category="Figures",
            labels={"figure": "5"},
        ),
    log:
        f"results/{EXP}/logs/fig5.log",
    params:
        query=FIGURES["query"],
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/figures.py"


rule fig3:
    """Figure 3: per-term gradient norms (vision, the figure variant) and batch values (LLM, when the
    config has an llm section) of the perturbed objective over training, at the selected lr."""
    input:
        unpack(fig3_inputs),
    output:
        report(
            f"results/{EXP}/fig3.pdf",
            caption="../report/fig3.rst",
            category="Figures",
            labels={"figure": "3"},
        ),
    log:
        f"results/{EXP}/logs/fig3.log",
    params:
        vision_chunks=fig3_vision_chunks(),
        llm_chunks=fig3_llm_chunks(),
        label=figure_variant(),
    conda:
        "../envs/daunce.yaml"
    script:
        "../../scripts/figures.py"
