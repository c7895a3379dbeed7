"""Datasets, from files on disk to a run's splits.

- records.py: Example, Splits, Row, the split names, text normalisation;
- files.py: where the files are (data_dir, $EMOREC_DATA_DIR, the cache) and their download
  (checksummed, atomic; zips too);
- readers.py: strict readers (UTF-8, csv, json), bad rows, label words, a dialogue's rows into
  examples with their context;
- corpora.py: the emotion corpora's own formats (MELD, EmoryNLP, Friends, Mastodon, EmoContext,
  DailyDialog, M3ED, IEMOCAP); sentiment.py: SST and the MMSA layout (MOSI, CH-SIMS);
- tables.py: a user's csv or jsonl (dataset=csv, dataset=jsonl); hub.py: dataset=hf;
- splits.py: `load_splits`, a run's data from its dataset config.

A dataset is one loader function, returning `records.Splits`, and one YAML in conf/dataset/
whose `load` node names it (README: "Add a dataset").
"""
