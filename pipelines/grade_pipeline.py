"""Grade a cohort on Kubeflow Pipelines v2: list the cases, grade them in parallel, gather one table.

``build_pipeline`` wires the components of ``components/grade.py``: ``list-cases`` finds the scans of
the ``cases`` and ``prefix`` parameters, ``grade-case`` grades each in a ``dsl.ParallelFor`` (at most
``parallelism`` at a time, each with its GPUs), and ``gather-cohort`` collects every case's record into
``cohort.parquet`` and a summary (grade counts, fractured vertebrae with a link to each case's
report). Outputs are the steps' artifacts, also copied under ``output_uri`` when it is given. A scan
that cannot be graded is recorded with its reason; the other scans are graded. Compile or submit it with
``healthivert submit --pipeline grade --compile-only FILE`` / ``healthivert submit --pipeline grade --host URL``.
"""

from collections.abc import Sequence

from kfp import dsl

from components.grade import build_grade_components

#: what ``healthivert submit`` builds this file as (the training pipeline is ``train``).
KIND = "grade"
#: Kubernetes resource name of the GPUs the grading step requests.
GPU_RESOURCE = "nvidia.com/gpu"
#: CPU and memory requests of each step (the grading step holds one scan and the networks).
RESOURCES = {"list-cases": ("1", "1G"), "grade-case": ("4", "16G"), "gather-cohort": ("1", "2G")}


def build_pipeline(image: str, gpus: int = 1, parallelism: int = 4, cases: Sequence[str | dict] = (),
                   prefix: str = "", grader_uri: str = "", output_uri: str = "", mlflow_uri: str = ""):
    """The pipeline function for one image.

    Args:
        image: container image of every step (``repository:tag``), the one of the training pipeline.
        gpus: GPUs requested by each grading step (0 requests none).
        parallelism: cases graded at the same time, at most.
        cases: default of the ``cases`` parameter: case locations (folders or ``s3://`` prefixes of
            cases in any layout ``preprocess`` reads) or mappings naming one scan's files (``ct``,
            ``labels``, optionally ``ctd``, ``case``).
        prefix: default of the ``prefix`` parameter: a folder or ``s3://`` prefix holding the cases.
        grader_uri: default of the ``grader_uri`` parameter: the grader bundle (``s3://`` prefix,
            mounted folder, or MLflow URI such as ``models:/healthivert-grader@candidate``).
        output_uri: default of the ``output_uri`` parameter: ``s3://`` prefix (or mounted folder) that
            receives one folder per case and the cohort files; empty: the artifacts only.
        mlflow_uri: MLflow tracking URI a ``models:/`` grader is read from (reachable from the cluster).
    """
    if parallelism < 1:
        raise ValueError(f"parallelism must be 1 or more, got {parallelism}")
    steps = build_grade_components(image)

    @dsl.pipeline(name="healthivert-grade", description="HealthiVert-GAN: Genant grades of a cohort's vertebrae, "
                                                        "one table and a summary")
    def healthivert_grade(cases: list = list(cases),  # noqa: B006 (a fresh list per build: KFP compiles the default)
                          prefix: str = prefix, grader_uri: str = grader_uri, output_uri: str = output_uri):
        listing = steps.list_cases(cases=cases, prefix=prefix).set_display_name("list-cases")
        tasks = {"list-cases": listing}
        with dsl.ParallelFor(listing.output, parallelism=parallelism) as entry:
            graded = steps.grade_case(entry=entry, grader_uri=grader_uri, output_uri=output_uri,
                                      mlflow_uri=mlflow_uri).set_display_name("grade-case")
            if gpus:
                graded.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpus)
        tasks["grade-case"] = graded
        tasks["gather-cohort"] = steps.gather_cohort(graded=dsl.Collected(graded.outputs["graded"]),
                                                     output_uri=output_uri).set_display_name("gather-cohort")
        for name, task in tasks.items():
            cpu, memory = RESOURCES[name]
            task.set_cpu_request(cpu).set_memory_request(memory)

    return healthivert_grade
