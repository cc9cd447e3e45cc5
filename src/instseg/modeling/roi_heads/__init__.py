"""RoI heads: box, mask and semantic heads and the (cascade) RoI head that drives them."""
