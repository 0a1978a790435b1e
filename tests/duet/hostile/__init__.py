"""The hostile researcher's test suite (issue 11): each module one class of attack, each run
as a real owner and a real researcher in separate OS processes over real WebRTC."""
