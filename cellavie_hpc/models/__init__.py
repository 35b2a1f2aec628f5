"""Models of the detection chain (Keras 3 only): refocus CNN, U-Net, detector, region classifier."""
