"""A MELD-format fixture written at test time: invented utterances (not from MELD) in the
column layout of MELD's {train,dev,test}_sent_emo.csv, with curly quotes and ellipses as the
real files have. Generated rather than committed, so no tracked file looks like a dataset copy."""

import csv
import tempfile
from pathlib import Path

COLUMNS = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime"

ROWS = {
    "train": [
        ("I can’t believe you did that for me!", "Ann", "joy", "positive"),
        ("Okay, so we meet at noon.", "Bob", "neutral", "neutral"),
        ("You ate my sandwich? Again?", "Cal", "anger", "negative"),
        ("Wait, you’re getting married?!", "Ann", "surprise", "positive"),
        ("I miss her so much.", "Bob", "sadness", "negative"),
        ("Ew, what is that smell…", "Cal", "disgust", "negative"),
        ("Did you hear that noise downstairs?", "Ann", "fear", "negative"),
        ("The meeting moved to Tuesday.", "Bob", "neutral", "neutral"),
        ("This is the best day ever!", "Cal", "joy", "positive"),
        ("Stop touching my stuff!", "Ann", "anger", "negative"),
        ("No way — you won the lottery?", "Bob", "surprise", "positive"),
        ("Nobody came to my party.", "Cal", "sadness", "negative"),
        ("That is gross, take it away.", "Ann", "disgust", "negative"),
        ("I don’t want to go in there alone.", "Bob", "fear", "negative"),
        ("Pass me the salt, please.", "Cal", "neutral", "neutral"),
        ("We did it, we really did it!", "Ann", "joy", "positive"),
    ],
    "dev": [
        ("Sure, Thursday works.", "Bob", "neutral", "neutral"),
        ("I got the job!", "Ann", "joy", "positive"),
        ("Get out of my room!", "Cal", "anger", "negative"),
        ("He left without saying goodbye.", "Bob", "sadness", "negative"),
        ("What? You’re kidding me!", "Ann", "surprise", "positive"),
        ("Something is moving under the bed.", "Cal", "fear", "negative"),
    ],
    "test": [
        ("Let’s order pizza tonight.", "Ann", "neutral", "neutral"),
        ("I love this song so much!", "Bob", "joy", "positive"),
        ("You broke it, you always break everything!", "Cal", "anger", "negative"),
        ("My cat ran away yesterday.", "Ann", "sadness", "negative"),
        ("Oh my God, is that a spider?", "Bob", "fear", "negative"),
        ("That milk is disgusting.", "Cal", "disgust", "negative"),
        ("You bought a boat?", "Ann", "surprise", "positive"),
        ("The bus comes at eight.", "Bob", "neutral", "neutral"),
    ],
}


def write(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, items in ROWS.items():
        with open(folder / f"{split}_sent_emo.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS.split(","))
            for i, (utterance, speaker, emotion, sentiment) in enumerate(items):
                writer.writerow(
                    [i + 1, utterance, speaker, emotion, sentiment, i // 4, i % 4, 1, 1, "00:00:01,000", "00:00:02,000"]
                )
    return folder


MELD_DIR = write(Path(tempfile.mkdtemp(prefix="emorec-meld-fixture-")) / "meld")


def predict_test_split(model, tokenizer, cfg) -> dict:
    """Predictions of a reloaded model on the fixture's test split, built the way run() builds
    them: the check that a saved adapter predicts what the run wrote."""
    import torch

    from emorec.data.corpora import load_meld
    from emorec.evaluate import predict
    from emorec.fast import Fast, dispatch
    from emorec.prompt import PromptFormat, encode_answers, encode_prompts, scoring_answers
    from emorec.tasks import LabelWords

    labels = list(cfg.dataset.labels)
    test = load_meld(labels, data_dir=str(MELD_DIR))["test"]
    answers = scoring_answers(encode_answers(tokenizer, cfg.prompt.template, cfg.prompt.system, labels))
    ids = encode_prompts(tokenizer, test, PromptFormat(cfg.prompt.template, cfg.prompt.system), labels, 256)
    engine = dispatch(model, Fast(), torch.device("cpu"))
    task = LabelWords(answers, answers, labels, tokenizer.pad_token_id, False, engine.answers)
    return predict(model, task, ids, engine, batch_size=3, autocast=False)
