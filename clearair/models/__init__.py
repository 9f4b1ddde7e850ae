"""Networks and their pretrained parts."""
