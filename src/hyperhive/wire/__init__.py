"""Wire models shared by every process: the two JSON-lines protocols and their framing."""
