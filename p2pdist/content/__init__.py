"""What a blob is: pieces, their byte ranges and the digests that verify them."""
