"""Fixtures in each dataset's official file format, with invented utterances (none taken from
the datasets), written at test time so that no tracked file looks like a copy of a dataset.

Each writer fills a folder the way the dataset's own distribution lays it out and returns it.
"""

import csv
import json
from pathlib import Path


def _csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_emorynlp(folder: Path) -> Path:
    header = "Utterance,Speaker,Emotion,Scene_ID,Utterance_ID,Season,Episode,Start_Time,End_Time".split(",")
    scenes = {
        "train": [
            [("Morning, everyone.", "['Ann Lee']", "Neutral"), ("You found my keys!", "['Bob Ray']", "Joyful")],
            [("Who left the door open?", "['Cal Moss']", "Mad"), ("Not us.", "['Ann Lee', 'Bob Ray']", "Scared")],
        ],
        "dev": [[("It is quiet here.", "['Ann Lee']", "Peaceful"), ("I can do this.", "['Bob Ray']", "Powerful")]],
        "test": [[("I lost the match.", "['Cal Moss']", "Sad"), ("Lunch is ready.", "['Ann Lee']", "Neutral")]],
    }
    for split, items in scenes.items():
        rows = [
            [text, speaker, emotion, scene + 1, u + 1, 2, 3, "00:00:01.000", "00:00:02.000"]
            for scene, utterances in enumerate(items)
            for u, (text, speaker, emotion) in enumerate(utterances)
        ]
        _csv(folder / f"emorynlp_{split}_final.csv", header, rows)
    return folder


def write_friends(folder: Path) -> Path:
    """EmotionLines JSON; apostrophes as the cp1252 code point \\x92, as the release has them."""

    def u(speaker, text, emotion):
        return {"speaker": speaker, "utterance": text, "emotion": emotion, "annotation": "5000000"}

    data = {
        "train": [
            [u("Ann", "I\x92m home!", "joy"), u("Bob", "Where were you?", "non-neutral"), u("Ann", "Out.", "neutral")],
            [u("Cal", "That is so gross.", "disgust"), u("Bob", "What was that?", "fear")],
        ],
        "dev": [[u("Ann", "You did what?", "surprise"), u("Cal", "I quit.", "sadness")]],
        "test": [[u("Bob", "Give it back!", "anger"), u("Ann", "Hmm.", "non-neutral"), u("Cal", "Fine.", "neutral")]],
    }
    folder.mkdir(parents=True, exist_ok=True)
    for split, dialogues in data.items():
        (folder / f"friends_{split}.json").write_text(json.dumps(dialogues, indent=1), encoding="utf-8")
    return folder


def write_mastodon(folder: Path) -> Path:
    def u(text, sentiment):
        return {"utterance": text, "sentiment": sentiment, "act": "I"}

    data = {
        "train": [[u("new instance is lovely !", "+"), u("the feed broke again", "-"), u("moving tomorrow", "*")]],
        "dev": [[u("love the emoji here", "+"), u("meh", "*")]],
        "test": [[u("servers are down", "-"), u("great thread", "+")], [u("what time is it", "*")]],
    }
    folder.mkdir(parents=True, exist_ok=True)
    for split, dialogues in data.items():
        (folder / f"{split}.json").write_text(json.dumps(dialogues), encoding="utf-8")
    return folder


def write_sst(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fine = {
        "train": [
            "4 a wonderful , moving film .",
            "0 a dreadful mess .",
            "2 it is a film .",
            "3 rather good .",
            "1 dull .",
        ],
        "dev": ["3 nice enough .", "1 weak plot ."],
        "test": ["4 a triumph .", "0 unwatchable .", "2 the film runs two hours ."],
    }
    binary = {
        "train": ["1 a wonderful , moving film .", "0 a dreadful mess .", "1 rather good ."],
        "dev": ["1 nice enough .", "0 weak plot ."],
        "test": ["1 a triumph .", "0 unwatchable ."],
    }
    for granularity, splits in (("fine", fine), ("binary", binary)):
        for split, lines in splits.items():
            (folder / f"stsa.{granularity}.{split}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_mosi(folder: Path) -> Path:
    rows = [
        ["vidA_1", "i really liked it", "2.4", "train"],
        ["vidA_2", "the acting was bad", "-1.8", "train"],
        ["vidA_10", "it was a movie", "0.0", "train"],
        ["vidB_1", "not sure about it", "-0.4", "train"],
        ["vidC_1", "great fun", "1.6", "dev"],
        ["vidC_2", "boring middle", "-2.0", "dev"],
        ["vidD_1", "what a waste", "-3.0", "test"],
        ["vidD_2", "so so", "0.0", "test"],
        ["vidD_3", "loved the ending", "2.8", "test"],
    ]
    _csv(folder / "label.csv", ["id", "text", "label", "mode"], rows)
    return folder


def write_dailydialog(folder: Path) -> Path:
    data = {
        "train": [
            (["Hi , how are you ?", "Great , I got a raise !", "Congratulations !"], [0, 4, 4]),
            (["The bus is late again .", "That makes me so angry ."], [0, 1]),
        ],
        "validation": [(["Did you see that ?", "Yes , scary ."], [6, 3])],
        "test": [(["I failed my exam .", "I am sorry to hear that .", "It smells awful here ."], [5, 0, 2])],
    }
    for split, dialogues in data.items():
        (folder / split).mkdir(parents=True, exist_ok=True)
        text = "".join(" __eou__ ".join(turns) + " __eou__\n" for turns, _ in dialogues)
        labels = "".join(" ".join(map(str, emotions)) + " \n" for _, emotions in dialogues)
        (folder / split / f"dialogues_{split}.txt").write_text(text, encoding="utf-8")
        (folder / split / f"dialogues_emotion_{split}.txt").write_text(labels, encoding="utf-8")
    return folder


def write_chsims(folder: Path) -> Path:
    header = "video_id,clip_id,text,label,label_T,label_A,label_V,annotation,mode".split(",")
    rows = [
        ["v01", "0002", "今天天气真好。", "0.8", "1.0", "0.6", "0.8", "Positive", "train"],
        ["v01", "0001", "我不太高兴。", "-0.6", "-0.8", "-0.4", "-0.6", "Negative", "train"],
        ["v02", "0001", "还可以吧。", "0.0", "0.2", "0.0", "-0.2", "Neutral", "train"],
        ["v03", "0001", "太棒了！", "1.0", "1.0", "1.0", "1.0", "Positive", "valid"],
        ["v03", "0002", "真让人失望。", "-0.8", "-1.0", "-0.6", "-0.8", "Negative", "valid"],
        ["v04", "0001", "我很生气。", "-1.0", "-1.0", "-1.0", "-1.0", "Negative", "test"],
        ["v04", "0002", "谢谢你。", "0.4", "0.6", "0.2", "0.4", "Positive", "test"],
    ]
    _csv(folder / "label.csv", header, rows)
    return folder


def write_m3ed(folder: Path) -> Path:
    def dialogue(speakers: dict, turns: list) -> dict:
        info = {k: {"Name": v, "Age": "adult", "Gender": "female"} for k, v in speakers.items()}
        dialog = {
            f"{uid}": {
                "StartTime": "00:00:01.000",
                "EndTime": "00:00:02.000",
                "Text": text,
                "Speaker": speaker,
                "EmoAnnotation": {"EmoAnnotator1": [emo], "final_mul_emo": [emo], "final_main_emo": emo},
            }
            for uid, speaker, text, emo in turns
        }
        return {"SpeakerInfo": info, "Dialog": dialog}

    annotation = {
        "showA": {
            "showA_1": dialogue(
                {"A": "小红", "B": "小明"},
                [("showA_1_2", "B", "你终于来了！", "Happy"), ("showA_1_1", "A", "我来了。", "Neutral")],
            ),
            "showA_2": dialogue({"A": "小红"}, [("showA_2_1", "A", "别碰我的东西！", "Anger")]),
        },
        "showB": {"showB_1": dialogue({"A": "老王"}, [("showB_1_1", "A", "真可怕。", "Fear")])},
        "showC": {
            "showC_1": dialogue(
                {"A": "阿强", "B": "阿美"},
                [("showC_1_1", "A", "他走了。", "Sad"), ("showC_1_2", "B", "什么？", "Surprise")],
            )
        },
    }
    (folder / "splitInfo").mkdir(parents=True, exist_ok=True)
    (folder / "annotation.json").write_text(json.dumps(annotation, ensure_ascii=False, indent=1), encoding="utf-8")
    for split, movies in (("train", ["showA"]), ("val", ["showB"]), ("test", ["showC"])):
        (folder / f"splitInfo/movie_list_{split}.txt").write_text("\n".join(movies) + "\n", encoding="utf-8")
    return folder


IEMOCAP_DIALOGUES = {
    1: "Ses01F_impro01",
    2: "Ses02M_impro03",
    3: "Ses03F_script01_1",
    4: "Ses04M_impro02",
    5: "Ses05F_impro01",
}


def write_iemocap(folder: Path) -> Path:
    """The release's layout: per session, transcriptions/<dialogue>.txt (`TURN [start-end]: text`,
    not in time order) and EmoEvaluation/<dialogue>.txt (`[start - end]<TAB>TURN<TAB>cat<TAB>[v, a, d]`)."""
    turns = [
        ("F000", 6.29, "Excuse me, is this the line?", "neu"),
        ("M000", 8.93, "Yes. Take a number.", "fru"),
        ("F001", 12.1, "Oh great, another hour.", "ang"),
        ("M001", 15.5, "We finally got the tickets!", "exc"),
        ("F002", 18.0, "That is wonderful news.", "hap"),
        ("M002", 21.2, "I miss my old job.", "sad"),
        ("F003", 24.4, "Wait, what was that noise?", "sur"),  # not one of the 6 classes
    ]
    for session, name in IEMOCAP_DIALOGUES.items():
        base = folder / f"Session{session}/dialog"
        (base / "transcriptions").mkdir(parents=True, exist_ok=True)
        (base / "EmoEvaluation").mkdir(parents=True, exist_ok=True)
        lines = [f"{name}_{t} [{s:08.4f}-{s + 2:08.4f}]: {text}" for t, s, text, _ in reversed(turns)]
        lines.insert(1, "M: [BREATHING]")  # lines that are not turns exist in the release
        (base / "transcriptions" / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        evaluation = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
        for t, s, _, cat in turns:
            evaluation += [
                f"[{s:.4f} - {s + 2:.4f}]\t{name}_{t}\t{cat}\t[2.5000, 2.5000, 2.5000]",
                "C-E1:\tOther;\t()",
                "",
            ]
        (base / "EmoEvaluation" / f"{name}.txt").write_text("\n".join(evaluation), encoding="utf-8")
    return folder


def write_emocontext(folder: Path) -> Path:
    """Tab-separated, a header, one three-turn conversation a line; a quote is just a character."""
    data = {
        "train": [
            ("0", "you there?", "yes, here", "i got the job!!", "happy"),
            ("1", 'he said "no"', "why?", "dunno", "others"),
        ],
        "dev": [("2", "my cat died", "so sorry", "i miss her", "sad")],
        "test": [("3", "you broke it", "not me", "liar, i am so mad", "angry"), ("4", "hi", "hello", "bye", "others")],
    }
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in data.items():
        lines = ["id\tturn1\tturn2\tturn3\tlabel", *("\t".join(row) for row in rows)]
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


WRITERS = {
    "emocontext": write_emocontext,
    "emorynlp": write_emorynlp,
    "friends": write_friends,
    "mastodon": write_mastodon,
    "sst": write_sst,
    "mosi": write_mosi,
    "dailydialog": write_dailydialog,
    "chsims": write_chsims,
    "m3ed": write_m3ed,
    "iemocap": write_iemocap,
}
