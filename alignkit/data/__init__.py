"""Where data becomes batches: files → rows → conversations → token ids + loss masks → padded batches."""
