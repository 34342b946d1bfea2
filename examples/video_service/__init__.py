"""The reference AI video service: ``uvicorn examples.video_service.app:create_app --factory``."""
