"""The HealthiVert pipeline for Kubeflow Pipelines v2: the DVC DAG of ``dvc.yaml``, step for step.

``build_pipeline`` wires the components of ``components/stages.py``: each step's output artifacts
feed the next steps' inputs, so the DAG follows from the data. Compile or submit it with
``healthivert submit --compile-only FILE`` / ``healthivert submit --host URL``.
"""

from kfp import dsl

from components.stages import build_components

#: Kubernetes resource name of the GPUs the training and synthesis steps request.
GPU_RESOURCE = "nvidia.com/gpu"
#: steps that train or run the generator (the ones worth a GPU).
GPU_STEPS = ("train-coarse", "train-fine", "synthesize")


def build_pipeline(image: str, gpus: int = 1, params_json: str = "", mlflow_uri: str = ""):
    """The pipeline function for one image.

    Args:
        image: container image of every step (``repository:tag``), holding this package.
        gpus: GPUs requested by each of :data:`GPU_STEPS` (0 requests none).
        params_json: default value of the ``params_json`` pipeline parameter: every parameter as one
            JSON line (``healthivert.stages.submit.params_json``).
        mlflow_uri: MLflow tracking URI the steps log to (reachable from the cluster); empty switches
            tracking off. When set, the steps group under one MLflow parent run keyed by the KFP job id
            (which also keeps KFP from reusing cached steps across runs).
    """
    steps = build_components(image)
    group = dsl.PIPELINE_JOB_ID_PLACEHOLDER if mlflow_uri else ""

    @dsl.pipeline(name="healthivert", description="HealthiVert-GAN: pseudo-healthy vertebra synthesis, RHLV and "
                                                  "Genant grading of vertebral compression fractures")
    def healthivert(params_json: str = params_json, overrides: str = ""):
        common = {"params_json": params_json, "overrides": overrides, "mlflow_uri": mlflow_uri,
                  "pipeline_group": group}
        raw = steps.phantom(**common).set_display_name("phantom")
        pre = steps.preprocess(raw=raw.outputs["raw"], **common).set_display_name("preprocess")
        data = pre.outputs["preprocessed"]
        coarse = steps.train_coarse(preprocessed=data, **common).set_display_name("train-coarse")
        attention = coarse.outputs["attention"]
        fine = steps.train_fine(preprocessed=data, attention=attention, coarse=coarse.outputs["coarse"],
                                **common).set_display_name("train-fine")
        synth = steps.synthesize(preprocessed=data, attention=attention, fine=fine.outputs["fine"],
                                 **common).set_display_name("synthesize")
        heights = steps.rhlv(preprocessed=data, synthesized=synth.outputs["synthesized"],
                             **common).set_display_name("rhlv")
        svm = steps.svm_fit(rhlv_data=heights.outputs["rhlv_data"], coarse=coarse.outputs["coarse"],
                            fine=fine.outputs["fine"], **common).set_display_name("svm-fit")
        steps.evaluate(preprocessed=data, synthesized=synth.outputs["synthesized"],
                       rhlv_data=heights.outputs["rhlv_data"], svm=svm.outputs["svm"],
                       **common).set_display_name("evaluate")
        if gpus:
            for task in (coarse, fine, synth):
                task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpus)

    return healthivert
