# BASH_ENV: read by every non-interactive bash in the image. Written by devbox-build.
# When a SageMaker SDK replaces the entrypoint with bash (ModelTrainer runs `bash -c
# sm_train.sh`), `train` never runs; ready /opt/ml for the image's user once, as it would:
# outputs writable, inputs the user's own. Anywhere else this is one test and nothing more.
if [ -z "${DEVBOX_TRAINING_READY:-}" ] && [ -d /opt/ml/input/config ]; then
  export DEVBOX_TRAINING_READY=1
  @BIN@/devbox-train --prepare || true
fi
