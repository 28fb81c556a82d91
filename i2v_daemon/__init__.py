"""i2v-daemon: drop an image and a prompt into a folder, get a video back."""

__version__ = "0.1.0"
