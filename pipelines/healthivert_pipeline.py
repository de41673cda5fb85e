"""The HealthiVert pipeline for Kubeflow Pipelines v2: the DVC DAG of ``dvc.yaml``, step for step.

``build_pipeline`` wires the components of ``components/stages.py``: each step's output artifacts
feed the next steps' inputs, so the DAG follows from the data. The first step brings in the dataset
named by the ``dataset_uri`` / ``grades_uri`` pipeline parameters, or the phantom when none is given;
the training steps keep their checkpoints under ``checkpoint_uri`` and are retried, resuming. Compile or submit it with
``healthivert submit --compile-only FILE`` / ``healthivert submit --host URL``.
"""

from kfp import dsl

from components.stages import build_components

#: Kubernetes resource name of the GPUs the training and synthesis steps request.
GPU_RESOURCE = "nvidia.com/gpu"
#: steps that train or run the generator (the ones worth a GPU).
GPU_STEPS = ("train-coarse", "train-fine", "synthesize")
#: CPU and memory requests of each step.
RESOURCES = {"dataset": ("1", "2G"), "preprocess": ("2", "8G"), "train-coarse": ("4", "16G"), "train-fine": ("4", "16G"),
             "synthesize": ("4", "16G"), "rhlv": ("2", "8G"), "svm-fit": ("1", "4G"), "evaluate": ("2", "8G")}


def build_pipeline(image: str, gpus: int = 1, params_json: str = "", mlflow_uri: str = "", dataset_uri: str = "",
                   grades_uri: str = "", checkpoint_uri: str = "", retries: int = 2):
    """The pipeline function for one image.

    Args:
        image: container image of every step (``repository:tag``), holding this package.
        gpus: GPUs requested by each of :data:`GPU_STEPS` (0 requests none).
        params_json: default value of the ``params_json`` pipeline parameter: every parameter as one
            JSON line (``healthivert.stages.submit.params_json``).
        mlflow_uri: MLflow tracking URI the steps log to (reachable from the cluster); empty switches
            tracking off. When set, the steps group under one MLflow parent run keyed by the KFP job id
            (which also keeps KFP from reusing cached steps across runs).
        dataset_uri: default of the ``dataset_uri`` pipeline parameter: a dataset folder (a mounted
            volume) or ``s3://`` prefix; empty: the phantom.
        grades_uri: default of the ``grades_uri`` pipeline parameter: the dataset's grades file.
        checkpoint_uri: default of the ``checkpoint_uri`` pipeline parameter: where the training steps
            keep their checkpoints (``s3://`` prefix or mounted path; empty: inside the pod).
        retries: times a failed training step is restarted (it resumes from its checkpoints).
    """
    steps = build_components(image)
    group = dsl.PIPELINE_JOB_ID_PLACEHOLDER if mlflow_uri else ""

    @dsl.pipeline(name="healthivert", description="HealthiVert-GAN: pseudo-healthy vertebra synthesis, RHLV and "
                                                  "Genant grading of vertebral compression fractures")
    def healthivert(params_json: str = params_json, overrides: str = "", dataset_uri: str = dataset_uri,
                    grades_uri: str = grades_uri, checkpoint_uri: str = checkpoint_uri):
        common = {"params_json": params_json, "overrides": overrides, "mlflow_uri": mlflow_uri,
                  "pipeline_group": group}
        source = steps.dataset(dataset_uri=dataset_uri, grades_uri=grades_uri, **common).set_display_name("dataset")
        pre = steps.preprocess(raw=source.outputs["raw"], grades=source.outputs["grades"],
                               **common).set_display_name("preprocess")
        data = pre.outputs["preprocessed"]
        coarse = steps.train_coarse(preprocessed=data, checkpoint_uri=checkpoint_uri,
                                    **common).set_display_name("train-coarse")
        attention = coarse.outputs["attention"]
        fine = steps.train_fine(preprocessed=data, attention=attention, coarse=coarse.outputs["coarse"],
                                checkpoint_uri=checkpoint_uri, **common).set_display_name("train-fine")
        synth = steps.synthesize(preprocessed=data, attention=attention, fine=fine.outputs["fine"],
                                 **common).set_display_name("synthesize")
        heights = steps.rhlv(preprocessed=data, synthesized=synth.outputs["synthesized"],
                             **common).set_display_name("rhlv")
        svm = steps.svm_fit(rhlv_data=heights.outputs["rhlv_data"], coarse=coarse.outputs["coarse"],
                            fine=fine.outputs["fine"], **common).set_display_name("svm-fit")
        report = steps.evaluate(preprocessed=data, synthesized=synth.outputs["synthesized"],
                                rhlv_data=heights.outputs["rhlv_data"], svm=svm.outputs["svm"],
                                **common).set_display_name("evaluate")
        for name, task in {"dataset": source, "preprocess": pre, "train-coarse": coarse, "train-fine": fine,
                           "synthesize": synth, "rhlv": heights, "svm-fit": svm, "evaluate": report}.items():
            cpu, memory = RESOURCES[name]
            task.set_cpu_request(cpu).set_memory_request(memory)
        if gpus:
            for task in (coarse, fine, synth):
                task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpus)
        if retries:
            for task in (coarse, fine):
                task.set_retry(num_retries=retries)

    return healthivert
