"""Score a wav2vec 2.0 upstream on a labelled speech task (SUPERB protocols) over several seeds.

    python recipes/finetune_speech.py --model.path runs/wav2vec2_tiny/model --task.name asterisk-speakers
    python recipes/finetune_speech.py --model.path runs/wav2vec2_tiny/model --task.name asterisk-en-asr \
        --protocol full --seeds [0,1,2]
    python recipes/finetune_speech.py --model.path runs/wav2vec2_tiny/model --task.name my_audiofolder \
        --task.transcript_column transcription --model.init random
    python recipes/finetune_speech.py --model.path runs/wav2vec2_tiny/model --task.name speech-keywords \
        --protocol full --grid.learning_rates [3e-5,1e-4,3e-4] --label_budget 200   # per-arm rate, 200 labels
    python recipes/finetune_speech.py --help   # the values it would use, and the built-in tasks

protocol probe = frozen upstream, softmax-weighted sum of its layers, light head (the learned layer
weights are printed); full = Wav2Vec2ForSequenceClassification / Wav2Vec2ForCTC with the conv
encoder frozen, on the shared trainer, exported for stock `pipeline()`. A mistake prints one line and
exits with status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

from sslcore.api import finetune_main
from speechssl.finetune import build_speech_finetune_config, finetune
from speechssl.tasks import describe_speech_tasks


def print_layer_weights(result) -> None:
    if result.layer_weights:
        print("learned layer weights per seed (0 = CNN features):", result.layer_weights)


def main(argv: list[str] | None = None):
    return finetune_main(argv, script="recipes/finetune_speech.py", build_config=build_speech_finetune_config,
                         finetune=finetune, catalogue_title="built-in speech tasks (task.name)",
                         catalogue=describe_speech_tasks, report=print_layer_weights)


if __name__ == "__main__":
    main()
