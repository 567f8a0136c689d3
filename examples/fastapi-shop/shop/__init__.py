"""An order service on FastAPI and async SQLAlchemy whose side effects and long work run through errands."""
