"""train: fine-tune an image classifier on a folder-per-class dataset and publish it to the model store."""
