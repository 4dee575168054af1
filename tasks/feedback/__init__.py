"""Users' feedback on served answers: the store the server writes (store.py), and the stage
that turns consented, rated exchanges into the next fine-tune's conversations (snapshot.py,
decontam.py)."""
